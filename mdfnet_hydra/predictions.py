"""Saved predictions (`<stage>/predictions/{val,test}.npz`): what evaluation reads instead of
re-running a model. Each file names the checkpoint that produced it and that file's digest, so a
stale file (checkpoint replaced since) is recognised and recomputed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdfnet_hydra.data.dataset import SplitData
from mdfnet_hydra.labels import CHEXPERT_LABELS


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
        return Predictions(self.probs[rows], self.targets[rows], self.mask[rows], self.sample_id[rows], self.group[rows],
                           self.checkpoint_sha256)


def save_predictions(path: Path, probs: np.ndarray, split: SplitData, indices: np.ndarray, checkpoint: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
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


def load_predictions(path: Path) -> Predictions:
    with np.load(path) as data:
        sha = str(data["checkpoint_sha256"]) if "checkpoint_sha256" in data else ""
        return Predictions(data["probs"], data["targets"], data["mask"], data["sample_id"], data["group"], sha)
