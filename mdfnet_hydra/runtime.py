"""Where and how a job computes: device, precision, process rank. Single process for now; the
DDP launcher fills rank / world_size and every file write is already gated on `is_main`."""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import numpy as np
import torch

from mdfnet_hydra.config import Precision, TrainerConfig


@dataclass
class Runtime:
    device: torch.device
    precision: Precision  # resolved: never `auto`
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> "Runtime":
        name = cfg.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"trainer.device={cfg.device} but CUDA is not available; use trainer.device=cpu")
        return cls(device=device, precision=resolve_precision(Precision(cfg.precision), device))

    def autocast(self) -> ContextManager:
        if self.precision is Precision.fp32:
            return nullcontext()
        dtype = torch.bfloat16 if self.precision is Precision.bf16 else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling is needed for fp16 only; a disabled scaler is a no-op."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision is Precision.fp16)

    def describe(self) -> str:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"device {self.device} ({where}), precision {self.precision.value}, world size {self.world_size}"


def resolve_precision(requested: Precision, device: torch.device) -> Precision:
    if device.type != "cuda":
        if requested in (Precision.fp16,):
            raise ValueError("trainer.precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
        return Precision.fp32 if requested is Precision.auto else requested
    if requested is Precision.auto:
        return Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16
    return requested


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
