"""Atomic checkpoint files that load with `torch.load(weights_only=True)`.

Everything stored is tensors or plain containers of str / int / float / bool / None, so a checkpoint
never needs pickle to load. A file is written to a temporary name and renamed (files.py), so a job
killed mid-save, or a disk that fills up, leaves the previous file intact. A file that cannot be
read all the same (copied half-way, damaged on disk) raises `DamagedFileError` naming it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from mdfnet_hydra.config import ConfigError
from mdfnet_hydra.files import DamagedFileError, atomic_target
from mdfnet_hydra.signals import signals_held

FORMAT_VERSION = 1
SUFFIX = ".pth"
# what `last` and the periodic `epoch_NNN` checkpoints hold besides the weights, to resume exactly
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "trainer_state", "torch_rng")


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    # through a Python file, so a full disk or quota surfaces as OSError(ENOSPC / EDQUOT), which a
    # path given to torch's C++ writer reduces to "enforce fail at inline_container.cc". A requeue
    # or stop signal waits for the write to end (`signals_held`).
    with signals_held(), atomic_target(path) as tmp, tmp.open("wb") as handle:
        torch.save(state, handle)
    return path


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's contents (`mmap`: tensors read lazily, for a look at its epoch / metrics)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # holds objects that only pickle could build: never run
        raise DamagedFileError(
            f"checkpoint {path} is not a plain-tensor checkpoint (torch.load(weights_only=True) refused: "
            f"{str(err).splitlines()[0]}); it was not loaded. Use a checkpoint this project wrote."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise DamagedFileError(
            f"checkpoint {path} is damaged or incomplete ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise DamagedFileError(f"checkpoint {path} holds no model weights (not a checkpoint of this project)")
    return state


def load_weights(
    model: torch.nn.Module, state: dict[str, Any], source: str | Path, model_config: Optional[dict] = None
) -> None:
    """Load `state`'s weights into `model`. Weights of another architecture are refused in one line
    naming the parameters and the `model.*` settings (`model_config`: this job's) that differ, where
    torch's error lists every mismatched parameter (dozens of lines)."""
    differences = weight_differences(model.state_dict(), state["model"])
    if differences:
        settings = model_settings_differences(state.get("config"), model_config) if model_config else []
        raise ConfigError(
            f"{source} holds the weights of another model ({'; '.join(differences)})"
            + (f"; it was trained with {', '.join(settings)}" if settings else "")
            + ": pass the model settings it was trained with"
        )
    model.load_state_dict(state["model"])


def weight_differences(current: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], shown: int = 3) -> list[str]:
    """The parameters (and buffers) whose names or shapes differ, the first `shown` and a count."""
    found = [
        f"{name}: {_shape(saved[name])} in the checkpoint, {_shape(tensor)} now"
        for name, tensor in current.items()
        if name in saved and tuple(saved[name].shape) != tuple(tensor.shape)
    ]
    found += [f"{name} not in the checkpoint" for name in current if name not in saved]
    found += [f"{name} not in this model" for name in saved if name not in current]
    return found[:shown] + ([f"{len(found) - shown} more"] if len(found) > shown else [])


def model_settings_differences(
    saved: Optional[dict], current: dict, keys: Optional[tuple[str, ...]] = None
) -> list[str]:
    """`model.<key>=<saved> (<now> now)` for each model setting (of `keys`, prefixes; None: all)
    that differs between a checkpoint's recorded config and `current` (this job's `model`)."""
    from mdfnet_hydra.identity import flatten

    before = flatten((saved or {}).get("model") or {}, "model.")
    now = flatten(current, "model.")
    return [
        f"{key}={before.get(key)} ({now.get(key)} now)"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key) and (keys is None or any(key == k or key.startswith(k + ".") for k in keys))
    ]


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(n) for n in tensor.shape) or "scalar"


def is_readable(path: Path) -> bool:
    """A cheap completeness check without loading the tensors: a torch checkpoint is a zip file
    whose directory sits at its end, so a truncated file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def is_resumable(state: dict[str, Any]) -> bool:
    return all(key in state for key in RESUME_KEYS)


def move_aside(stage_dir: Path) -> Path:
    """Move a phase's results (metrics.json, predictions, checkpoints, TensorBoard events) into
    `replaced-<time>/` before the phase is trained again from the start, so no old file is mistaken
    for a new one and no old curve is drawn into the new. metrics.json goes first: a job killed
    midway leaves an incomplete phase, never a result beside the files of another training."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = stage_dir / f"replaced-{stamp}"
    for n in range(2, 1000):  # a second restart within the same second gets a directory of its own
        try:
            aside.mkdir(parents=True)
            break
        except FileExistsError:
            aside = stage_dir / f"replaced-{stamp}-{n}"
    for name in ("metrics.json", "predictions", "checkpoints", "tensorboard"):
        if (stage_dir / name).exists():
            os.replace(stage_dir / name, aside / name)
    return aside


class CheckpointManager:
    """`last` every epoch, named bests on improvement, `epoch_NNN` every n epochs keeping the newest k.

    `last` and `epoch_NNN` hold the full training state, so a damaged or deleted `last` falls back
    to the newest periodic checkpoint instead of restarting the stage over its results.
    """

    def __init__(self, directory: Path, every_n_epochs: int, keep_last: int, enabled: bool = True) -> None:
        self.directory = directory
        self.every_n_epochs = every_n_epochs
        self.keep_last = keep_last
        self.enabled = enabled

    def path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"

    def save(self, name: str, state: dict[str, Any]) -> Path:
        path = self.path(name)
        if self.enabled:
            save_atomic(state, path)
        return path

    def periodic(self) -> list[Path]:
        return sorted(self.directory.glob(f"epoch_[0-9][0-9][0-9]{SUFFIX}"))

    def save_periodic(self, epoch: int, last: Path) -> None:
        """`epoch_NNN` as a hard link to the `last` just written (no second serialisation; the
        next `last` is a new file, so the link keeps this one), a copy where links are refused."""
        if not self.enabled or self.every_n_epochs <= 0 or epoch % self.every_n_epochs != 0:
            return
        target = self.path(f"epoch_{epoch:03d}")
        with atomic_target(target) as tmp:
            try:
                os.link(last, tmp)
            except OSError:
                shutil.copyfile(last, tmp)
        periodic = self.periodic()
        for old in periodic[: max(0, len(periodic) - self.keep_last)]:
            old.unlink(missing_ok=True)

    def rebuild_best(self, name: str, epoch: int, last_name: str) -> Optional[Path]:
        """Write the best checkpoint `name` of `epoch` again from a full state of that epoch (its
        `epoch_NNN`, else `last`), which holds the same weights, metrics and records besides the
        training state: the same bytes as the lost file, so a stage 2 started from it stays valid.
        Returns the state's file, or None where no full state of that epoch is left."""
        for source in (self.path(f"epoch_{epoch:03d}"), self.path(last_name)):
            if not source.is_file():
                continue
            try:
                state = load_checkpoint(source)
            except DamagedFileError:
                continue
            if is_resumable(state) and state.get("epoch") == epoch:
                self.save(name, {k: v for k, v in state.items() if k not in RESUME_KEYS})
                return source
        return None

    def existing(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SUFFIX}")) if self.directory.is_dir() else []

    def resume_state(self, last_name: str) -> tuple[Optional[Path], Optional[dict[str, Any]], list[str]]:
        """The newest valid full training state: `last`, else the newest periodic checkpoint.

        Returns (path, state, problems): problems name each candidate that could not be used."""
        problems = []
        candidates = [self.path(last_name)] + list(reversed(self.periodic()))
        for path in candidates:
            if not path.is_file():
                if path.name == f"{last_name}{SUFFIX}":
                    problems.append(f"{path} is missing")
                continue
            try:
                state = load_checkpoint(path)
            except DamagedFileError as err:
                problems.append(str(err))
                continue
            if not is_resumable(state):
                problems.append(f"{path} holds weights only (no optimizer / scheduler state)")
                continue
            return path, state, problems
        return None, None, problems
