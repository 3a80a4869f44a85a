"""Opening a job: its training config, data splits, fitted preprocessing, datasets and model.

Training, the evaluation's recomputed predictions, the benchmark and its start-up probe all open a
job here, the same way, so the benchmark times what a job runs, the evaluation sees what training
saw, and a change to what preprocessing holds is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig

from mdfnet_hydra.data.dataset import Collator, MultimodalDataset, SplitData, load_splits
from mdfnet_hydra.data.preprocessing import Preprocessing


def modality_names(cfg: DictConfig) -> list[str]:
    """The job's modalities as plain names, in the config's order."""
    return [getattr(m, "value", m) for m in cfg.modality.inputs]


@dataclass
class Job:
    """What a training job works on, built once and shared by every phase."""

    cfg: DictConfig
    modalities: list[str]
    root: Path
    splits: dict[str, SplitData]
    prep: Preprocessing
    datasets: dict[str, MultimodalDataset] = field(default_factory=dict)

    @property
    def collator(self) -> Collator:
        return Collator(self.prep.pad_id, self.cfg.model.text.length_buckets)

    def build_model(self):
        """A fresh model for this job's modalities and preprocessing (random or configured weights)."""
        from mdfnet_hydra.models.mdfnet import build_model

        return build_model(self.cfg.model, self.modalities, self.prep.clinical_dim, self.prep.tokenizer)


def open_job(
    cfg: DictConfig,
    state: Optional[dict] = None,
    splits: Optional[Sequence[str]] = None,
    first: Optional[Callable[[Callable[[], Any]], Any]] = None,
) -> Job:
    """Read the splits, fit the preprocessing on the training split (or restore it from a
    checkpoint's `preprocessing` state), and build the datasets of `splits` (None: every non-empty
    split) as a training job opens them: `data.augment` on the training split only, token ids through
    the shared token cache unless `data.token_cache=false`.

    `first`: runs the dataset build on one process before the others (a data-parallel job: rank 0
    fills the token cache, the other ranks then read it); None builds here at once."""
    modalities = modality_names(cfg)
    root, split_data = load_splits(cfg.data, int(cfg.seed))
    prep = Preprocessing.create(cfg.model, modalities, split_data["train"], state=state)
    chosen = {name: split for name, split in split_data.items() if splits is None or name in splits}

    def build() -> dict[str, MultimodalDataset]:
        return prep.datasets(chosen, root, cfg)

    datasets = first(build) if first is not None else build()
    return Job(cfg, modalities, root, split_data, prep, datasets)
