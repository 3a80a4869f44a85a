"""Where and how a process computes: device, precision, its rank in a data-parallel job, and the
per-device batch that keeps the effective batch what the config says."""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Optional

import numpy as np
import torch

from mdfnet_hydra.config import Precision, TrainerConfig
from mdfnet_hydra.distributed import WorkerEnv, default_backend


@dataclass
class Runtime:
    device: torch.device
    precision: Precision  # resolved: never `auto`
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None  # process-group backend when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_config(cls, cfg: TrainerConfig, env: Optional[WorkerEnv] = None) -> "Runtime":
        name = cfg.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"trainer.device={cfg.device} but CUDA is not available; use trainer.device=cpu")
        if env is None:
            return cls(device=device, precision=resolve_precision(Precision(cfg.precision), device))
        if device.type == "cuda":
            device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(device)
        return cls(
            device=device,
            precision=resolve_precision(Precision(cfg.precision), device),
            rank=env.rank,
            local_rank=env.local_rank,
            world_size=env.world_size,
            backend=cfg.backend or default_backend(device.type),
        )

    def per_device_batch(self, cfg: TrainerConfig) -> int:
        """`batch_size` per device, or `global_batch_size` split evenly over the world."""
        if cfg.global_batch_size is None:
            return int(cfg.batch_size)
        if cfg.global_batch_size % self.world_size:
            raise ValueError(
                f"trainer.global_batch_size={cfg.global_batch_size} does not split over {self.world_size} workers"
            )
        return int(cfg.global_batch_size) // self.world_size

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
        parallel = f"backend {self.backend}, rank {self.rank}" if self.distributed else "single process"
        return f"world size {self.world_size} ({parallel}), device {self.device} ({where}), precision {self.precision.value}"


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
