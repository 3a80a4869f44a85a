"""Atomic checkpoint files that load with `torch.load(weights_only=True)`.

Everything stored is tensors or plain containers of str / int / float / bool / None, so a checkpoint
never needs pickle to load. A file is written to a temporary name and renamed, so a job killed
mid-save leaves the previous file intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
SUFFIX = ".pth"


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointManager:
    """`last` every epoch, named bests on improvement, `epoch_NNN` every n epochs keeping the newest k."""

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

    def save_periodic(self, epoch: int, state: dict[str, Any]) -> None:
        if self.every_n_epochs <= 0 or epoch % self.every_n_epochs != 0:
            return
        self.save(f"epoch_{epoch:03d}", state)
        if self.enabled:
            periodic = sorted(self.directory.glob(f"epoch_[0-9][0-9][0-9]{SUFFIX}"))
            for old in periodic[: max(0, len(periodic) - self.keep_last)]:
                old.unlink(missing_ok=True)
