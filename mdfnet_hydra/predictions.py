"""Saved predictions (`<stage>/predictions/{val,test}.npz`): what evaluation reads instead of
re-running a model. Each file names the checkpoint that produced it and that file's digest, so a
stale file (checkpoint replaced since) is recognised and recomputed.

A file is written whole or not at all (`mdfnet_hydra.files.atomic_target`), and read without pickle:
one that cannot be read, or does not hold what `save_predictions` writes, raises `DamagedFileError`
naming it, so the evaluation can recompute it from the checkpoint or leave the run out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdfnet_hydra.data.dataset import SplitData
from mdfnet_hydra.files import DamagedFileError, atomic_target
from mdfnet_hydra.labels import CHEXPERT_LABELS

REQUIRED = ("probs", "targets", "mask", "sample_id", "group")


class DamagedPredictionsError(DamagedFileError):
    """A predictions file that cannot be used; `path` and `reason` for whoever reports it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"saved predictions {path} are damaged ({reason}): delete the file to have the evaluation "
            f"recompute them from the checkpoint, or rerun the stage"
        )


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Predictions:
    probs: np.ndarray  # (N, 14)
    targets: np.ndarray  # (N, 14) after the label policy
    mask: np.ndarray  # (N, 14) 1 = scored
    sample_id: np.ndarray  # (N,) str
    group: np.ndarray  # (N,) patient index within the split (not the patient id)
    checkpoint_sha256: str = ""

    def subset(self, rows: np.ndarray) -> "Predictions":
        return Predictions(
            self.probs[rows],
            self.targets[rows],
            self.mask[rows],
            self.sample_id[rows],
            self.group[rows],
            self.checkpoint_sha256,
        )


def save_predictions(path: Path, probs: np.ndarray, split: SplitData, indices: np.ndarray, checkpoint: Path) -> None:
    """Write `path` atomically: a job killed mid-write leaves the previous file (or none)."""
    arrays = dict(
        probs=probs.astype(np.float32),
        targets=split.targets[indices],
        mask=split.mask[indices],
        raw_labels=split.raw_labels[indices],
        sample_id=split.frame["sample_id"].to_numpy(dtype=str)[indices],
        group=split.group[indices],
        label_names=np.array(CHEXPERT_LABELS),
        checkpoint=np.array(checkpoint.name),
        checkpoint_sha256=np.array(file_digest(checkpoint)),
    )
    with atomic_target(path) as tmp:
        # through a handle: given a name, np.savez would append ".npz" to the temporary's name
        with tmp.open("wb") as handle:
            np.savez_compressed(handle, **arrays)


def load_predictions(path: Path) -> Predictions:
    """The predictions saved in `path`; `DamagedFileError` if it is unreadable, truncated, holds
    objects that need pickle, or lacks / mis-shapes what `save_predictions` writes."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive (one array)")
        with data:
            missing = [key for key in REQUIRED if key not in data.files]
            if missing:
                raise ValueError(f"no {', '.join(missing)} array(s) in it")
            arrays = {key: data[key] for key in REQUIRED}
            sha = str(data["checkpoint_sha256"]) if "checkpoint_sha256" in data.files else ""
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes numpy / zipfile raise
        raise DamagedPredictionsError(path, _reason(err)) from err
    problem = _shape_problem(arrays)
    if problem:
        raise DamagedPredictionsError(path, problem)
    return Predictions(arrays["probs"], arrays["targets"], arrays["mask"], arrays["sample_id"], arrays["group"], sha)


def _reason(err: Exception) -> str:
    if "Object arrays" in str(err):
        return "an array in it holds Python objects, which would need pickle to load (refused)"
    if "pickle" in str(err):
        return "not an .npz archive; numpy would have to unpickle it (refused)"
    return " ".join(f"{type(err).__name__}: {err}".split())


def _shape_problem(arrays: dict[str, np.ndarray]) -> str:
    probs = arrays["probs"]
    if probs.ndim != 2 or probs.shape[1] != len(CHEXPERT_LABELS) or probs.dtype.kind != "f":
        return f"probs is {probs.dtype} {probs.shape}, not float (N, {len(CHEXPERT_LABELS)})"
    n = probs.shape[0]
    for key in ("targets", "mask"):
        if arrays[key].shape != probs.shape or arrays[key].dtype.kind not in "fiub":
            return f"{key} is {arrays[key].dtype} {arrays[key].shape}, not numeric {probs.shape} like probs"
        if not np.isin(arrays[key], (0, 1)).all():
            return f"{key} holds values other than 0 and 1"
    if not np.isfinite(probs).all():
        return "probs holds NaN or infinite values"
    for key in ("sample_id", "group"):
        if arrays[key].shape != (n,):
            return f"{key} has shape {arrays[key].shape}, not ({n},)"
    if arrays["sample_id"].dtype.kind not in "US":
        return f"sample_id is {arrays['sample_id'].dtype}, not strings"
    if arrays["group"].dtype.kind not in "iu":
        return f"group is {arrays['group'].dtype}, not integers"
    return ""
