"""Finding finished runs under a directory and getting their validation / test predictions.

A run is one stage directory (`<job>/stage1`, `<job>/stage2`) with a metrics.json and checkpoints,
from any launcher. Saved predictions are reused when they were made by the chosen checkpoint (same
file digest); otherwise the checkpoint is loaded and run on the split again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mdfnet_hydra.checkpoint import load_checkpoint
from mdfnet_hydra.config import TrainConfig
from mdfnet_hydra.predictions import Predictions, file_digest, load_predictions

log = logging.getLogger(__name__)

HYPERPARAMETERS = {
    "lr_stage1": ("phases", "stage1", "lr"),
    "lr_encoders_stage2": ("phases", "stage2", "lr_encoders"),
    "lr_fusion_stage2": ("phases", "stage2", "lr_fusion"),
    "weight_decay": ("optimizer", "weight_decay"),
    "dropout_fusion": ("model", "fusion", "dropout"),
    "dropout_head": ("model", "head", "dropout1"),
    "bce_weight": ("loss", "bce_weight"),
    "focal_alpha": ("loss", "focal_alpha"),
    "focal_gamma": ("loss", "focal_gamma"),
}


@dataclass
class Run:
    name: str  # relative to the experiments directory, e.g. "sweep/3_vision/stage2"
    directory: Path
    stage: str
    modalities: list[str]
    config: dict[str, Any]
    seed: int
    source: dict[str, str] = field(default_factory=dict)  # split -> "saved" | "recomputed"

    @property
    def modality(self) -> str:
        return "all" if len(self.modalities) == 3 else "_".join(self.modalities)

    @property
    def label(self) -> str:
        """The name in figure legends: with the modality where the directory names do not say it."""
        return self.name if self.modality in self.name else f"{self.name} ({self.modality})"

    def hyperparameters(self) -> dict[str, Any]:
        out = {}
        for name, path in HYPERPARAMETERS.items():
            node: Any = self.config
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            out[name] = node
        return out

    def signature(self) -> str:
        """Everything that defines the configuration except the seed (to aggregate seeds)."""
        keep = {k: self.config.get(k) for k in ("modality", "model", "phases", "loss", "optimizer", "scheduler")}
        keep["data"] = {k: (self.config.get("data") or {}).get(k) for k in ("name", "labels", "small_sample")}
        keep["stage"] = self.stage
        return json.dumps(keep, sort_keys=True, default=str)


def discover(experiments_dir: Path, exclude: Optional[Path] = None) -> list[Run]:
    runs = []
    for metrics in sorted(experiments_dir.rglob("metrics.json")):
        directory = metrics.parent
        if exclude is not None and exclude in directory.parents:
            continue
        if not (directory / "checkpoints").is_dir() or not (directory / "config.yaml").is_file():
            continue
        result = json.loads(metrics.read_text())
        if "stage" not in result or not result.get("val"):
            continue  # a job-level summary, or a stage that never finished an epoch
        config = OmegaConf.to_container(OmegaConf.load(directory / "config.yaml"), resolve=False)
        runs.append(Run(
            name=str(directory.relative_to(experiments_dir)) if directory != experiments_dir else directory.name,
            directory=directory,
            stage=result["stage"],
            modalities=list(result["modalities"]),
            config=config,
            seed=int(config.get("seed", 0)),
        ))
    return runs


def run_predictions(run: Run, split: str, checkpoint: str, data_root: Optional[str], options) -> Optional[Predictions]:
    """Saved predictions of `checkpoint` on `split`, or new ones (`options`: evaluation.*)."""
    ckpt_path = run.directory / "checkpoints" / f"{checkpoint}.pth"
    if not ckpt_path.is_file():
        log.warning("%s: no %s checkpoint; left out", run.name, checkpoint)
        return None
    saved = run.directory / "predictions" / f"{split}.npz"
    if saved.is_file() and data_root is None:
        preds = load_predictions(saved)
        if preds.checkpoint_sha256 and preds.checkpoint_sha256 == file_digest(ckpt_path):
            run.source[split] = "saved"
            return preds
    run.source[split] = "recomputed"
    model, datasets, prep = load_run_model(ckpt_path, data_root, options.device, splits=(split,))
    return predict(model, datasets[split], prep.pad_id, options, file_digest(ckpt_path))


def run_config(ckpt: dict, data_root: Optional[str]) -> DictConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt["config"])
    if data_root is not None:
        cfg.data.root = data_root
        cfg.data.synthetic = None
    return cfg


def load_run_model(ckpt_path: Path, data_root: Optional[str], device: str, splits=("test",)):
    """The checkpoint's model (eval mode, on device), datasets built with its own preprocessing, and
    that preprocessing (for the collator's padding id)."""
    from mdfnet_hydra.data.dataset import load_splits
    from mdfnet_hydra.data.preprocessing import Preprocessing
    from mdfnet_hydra.models.mdfnet import build_model

    ckpt = load_checkpoint(ckpt_path)
    cfg = run_config(ckpt, data_root)
    modalities = list(ckpt["modalities"])
    root, split_data = load_splits(cfg.data, int(cfg.seed))
    prep = Preprocessing.create(cfg.model, modalities, split_data["train"], state=ckpt["preprocessing"])
    model = build_model(cfg.model, modalities, prep.clinical_dim, prep.tokenizer)
    model.load_state_dict(ckpt["model"])
    model.eval().to(resolve_device(device))
    return model, {s: prep.dataset(split_data[s], root, cfg.model) for s in splits}, prep


@torch.no_grad()
def predict(model, dataset, pad_id: int, options, checkpoint_sha256: str) -> Predictions:
    """Probabilities of `model` on `dataset`, read with this machine's loader choices
    (`evaluation.num_workers`: null = chosen from the machine, as in training)."""
    from torch.utils.data import DataLoader

    from mdfnet_hydra.data.dataset import Collator
    from mdfnet_hydra.data.loading import describe_loader, loader_settings

    from mdfnet_hydra.config import DataConfig

    runtime = evaluation_runtime(options.device)
    # the machine's choices for every loader setting but the worker count evaluation.* may fix
    loader_choices = OmegaConf.merge(OmegaConf.structured(DataConfig), {"num_workers": options.num_workers})
    loader = DataLoader(dataset, batch_size=int(options.batch_size), shuffle=False, collate_fn=Collator(pad_id),
                        **loader_settings(loader_choices, runtime, dataset, persistent=False))
    log.info("predicting %d %s cases on %s, data loading %s", len(dataset), dataset.split.name, runtime.device,
             describe_loader(loader))
    probs = []
    for batch in loader:
        batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}
        probs.append(torch.sigmoid(model(batch).float()).cpu())
    split = dataset.split
    return Predictions(torch.cat(probs).numpy(), split.targets, split.mask, split.frame["sample_id"].to_numpy(dtype=str),
                       split.group, checkpoint_sha256)


def evaluation_runtime(device: str):
    """fp32 on `evaluation.device` (auto: CUDA where the machine has it), with the machine's choices."""
    from mdfnet_hydra.config import Precision
    from mdfnet_hydra.machine import Machine
    from mdfnet_hydra.runtime import Runtime, resolve_device as runtime_device

    machine = Machine.detect()
    target, where = runtime_device(device, machine)
    return Runtime(device=where, precision=Precision.fp32, machine=machine, target=target)


def resolve_device(name: str) -> torch.device:
    return evaluation_runtime(name).device


def aligned(a: Predictions, b: Predictions) -> Optional[tuple[Predictions, Predictions]]:
    """Both runs' predictions on the same cases in the same order, or None if the sets differ."""
    if len(a.sample_id) != len(b.sample_id) or set(a.sample_id) != set(b.sample_id):
        return None
    return a.subset(np.argsort(a.sample_id, kind="stable")), b.subset(np.argsort(b.sample_id, kind="stable"))
