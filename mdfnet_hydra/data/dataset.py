"""Splits of a prepared dataset and the torch Dataset that serves only the modalities in use."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from mdfnet_hydra.config import DataConfig
from mdfnet_hydra.data.manifest import SPLITS, label_matrix, read_manifest
from mdfnet_hydra.data.synthetic import ensure_synthetic
from mdfnet_hydra.data.targets import encode_targets
from mdfnet_hydra.data.token_cache import TokenIds

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    """One split's rows with their encoded targets; `group` indexes patients within the split."""

    name: str
    frame: pd.DataFrame
    targets: np.ndarray
    mask: np.ndarray
    raw_labels: np.ndarray

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def group(self) -> np.ndarray:
        return pd.factorize(self.frame["patient_id"])[0]


def resolve_root(data: DataConfig) -> Path:
    """The dataset directory, generating the synthetic dataset there on first use."""
    root = Path(data.root).expanduser().resolve()
    if data.synthetic is not None:
        ensure_synthetic(root, data.synthetic.num_samples, data.synthetic.image_size, data.synthetic.seed)
    return root


def load_splits(data: DataConfig, seed: int) -> tuple[Path, dict[str, SplitData]]:
    root = resolve_root(data)
    frame = read_manifest(root / data.manifest)
    splits: dict[str, SplitData] = {}
    for name in SPLITS:
        part = frame[frame["split"] == name]
        if data.small_sample is not None and len(part) > data.small_sample:
            part = part.sample(n=data.small_sample, random_state=seed).sort_index()
        part = part.reset_index(drop=True)
        raw = label_matrix(part)
        targets, mask = encode_targets(raw, data.labels.uncertain, data.labels.blank)
        splits[name] = SplitData(name, part, targets, mask, raw)
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise ValueError(f"{root / data.manifest}: the train and val splits must not be empty")
    return root, splits


class MultimodalDataset(Dataset):
    """Items hold only what the chosen modalities need: no image is decoded for a text-only run."""

    def __init__(
        self,
        split: SplitData,
        root: Path,
        image_transform: Optional[Callable[[Image.Image], torch.Tensor]] = None,
        token_ids: Optional[TokenIds] = None,
        clinical: Optional[np.ndarray] = None,
    ) -> None:
        self.split = split
        self.image_paths = [root / p for p in split.frame["image_path"]] if image_transform else None
        self.image_transform = image_transform
        self.token_ids = token_ids
        self.clinical = torch.from_numpy(clinical) if clinical is not None else None
        self.targets = torch.from_numpy(split.targets)
        self.mask = torch.from_numpy(split.mask)

    def __len__(self) -> int:
        return len(self.split)

    def restricted_to(self, modality: str) -> "MultimodalDataset":
        """A view serving only one modality's inputs (what one encoder reads), targets included."""
        view = copy.copy(self)
        view.image_paths = self.image_paths if modality == "vision" else None
        view.token_ids = self.token_ids if modality == "text" else None
        view.clinical = self.clinical if modality == "clinical" else None
        return view

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"index": torch.tensor(index), "targets": self.targets[index], "mask": self.mask[index]}
        if self.image_paths is not None:
            with Image.open(self.image_paths[index]) as image:
                item["image"] = self.image_transform(image)
        if self.token_ids is not None:
            item["input_ids"] = self.token_ids[index]
        if self.clinical is not None:
            item["clinical"] = self.clinical[index]
        return item


class Collator:
    """Stacks tensors and pads token ids to the longest sequence in the batch (not to max_length)."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(items, dict):  # already a batch (datasets with __getitems__)
            return items
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "input_ids"}
        if "input_ids" in items[0]:
            seqs = [it["input_ids"] for it in items]
            ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)
            lengths = torch.tensor([len(s) for s in seqs])
            batch["input_ids"] = ids
            batch["attention_mask"] = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        return batch
