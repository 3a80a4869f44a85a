"""Where and how a process computes: device, precision, its rank in a data-parallel job, and the
per-device batch that keeps the effective batch what the config says. The choices made from the
machine (device, `precision=auto`, fused AdamW) come from a `Machine`, so tests can inject one."""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ContextManager, Optional

import numpy as np
import torch

from mdfnet_hydra.config import ConfigError, Precision, TrainerConfig, global_batch_problem, refuse
from mdfnet_hydra.distributed import WorkerEnv, default_backend
from mdfnet_hydra.machine import Machine, gpus_hidden_by_submitit_local, set_compute_threads


@dataclass
class Runtime:
    device: torch.device  # where this process computes
    precision: Precision  # resolved: never `auto`
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None  # process-group backend when world_size > 1
    machine: Machine = field(default_factory=Machine.detect)
    # the device kind the machine-derived choices are made for: `device.type`, except on a
    # machine that MDFNET_MACHINE describes as CUDA without one (CUDA's choices, CPU compute)
    target: str = ""
    # torch's intra-op threads in this process and why (machine.set_compute_threads)
    threads: tuple[int, str] = field(default_factory=lambda: (torch.get_num_threads(), "torch's default"))

    def __post_init__(self) -> None:
        self.target = self.target or self.device.type

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def fused_optimizer(self) -> bool:
        """Fused AdamW (one kernel per step instead of one per tensor) for a CUDA machine's step."""
        return self.target == "cuda"

    @classmethod
    def from_config(
        cls, cfg: TrainerConfig, env: Optional[WorkerEnv] = None, machine: Optional[Machine] = None
    ) -> "Runtime":
        machine = machine if machine is not None else Machine.detect()
        refuse_gpus_hidden_by_the_launcher(cfg.device, machine)
        threads = set_compute_threads()
        target, device = resolve_device(cfg.device, machine)
        precision = resolve_precision(Precision(cfg.precision), target, machine)
        if env is None:
            return cls(device=device, precision=precision, machine=machine, target=target, threads=threads)
        if device.type == "cuda":
            device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(device)
        return cls(
            device=device,
            precision=precision,
            rank=env.rank,
            local_rank=env.local_rank,
            world_size=env.world_size,
            backend=cfg.backend or default_backend(device.type),
            machine=machine,
            target=target,
            threads=threads,
        )

    def per_device_batch(self, cfg: TrainerConfig) -> int:
        """`batch_size` per device, or `global_batch_size` split evenly over the world."""
        if cfg.global_batch_size is None:
            return int(cfg.batch_size)
        problem = global_batch_problem(cfg.global_batch_size, self.world_size)
        if problem:  # the launcher refuses it before starting workers (launch.py); torchrun's ranks here
            refuse([problem])
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
        return (
            f"world size {self.world_size} ({parallel}), device {self.device} ({where}), precision {self.precision.value}; "
            f"machine: {self.machine.describe()}; {self.threads[0]} compute thread(s) ({self.threads[1]})"
        )


def refuse_gpus_hidden_by_the_launcher(name: str, machine: Machine) -> None:
    """`trainer.device=auto` in a job that submitit_local started without GPUs on a GPU node would
    train on the CPU without a word: refused, naming both ways out (a machine MDFNET_MACHINE
    describes is taken as described)."""
    hidden = gpus_hidden_by_submitit_local() if name == "auto" and not machine.cuda and not machine.simulated else 0
    if hidden:
        raise ConfigError(
            f"hydra/launcher=submitit_local gave this job none of the node's {hidden} GPU(s) (CUDA_VISIBLE_DEVICES='': "
            "hydra.launcher.gpus_per_node is unset or 0): set hydra.launcher.gpus_per_node (every job of a batch "
            "gets GPUs 0..n-1), or trainer.device=cpu to train on the CPU"
        )


def resolve_device(name: str, machine: Machine, key: str = "trainer.device") -> tuple[str, torch.device]:
    """(the device kind choices are made for, the device to compute on) for `trainer.device` (or the
    option `key` names)."""
    target = ("cuda" if machine.cuda else "cpu") if name == "auto" else torch.device(name).type
    if target == "cuda" and not machine.cuda:
        raise ConfigError(f"{key}={name} but the machine has no CUDA ({machine.describe()}); use {key}=cpu")
    device = torch.device(target if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")  # a machine MDFNET_MACHINE describes as CUDA: its choices, computed here
    return target, device


def resolve_precision(requested: Precision, target: str, machine: Machine) -> Precision:
    """`auto`: bf16 on a bf16-capable CUDA device, fp16 with a gradient scaler on older ones, fp32
    on CPU. fp16 and bf16 are honoured on CPU too (autocast and the scaler run there), which is how
    a CPU machine exercises a GPU's mixed-precision path."""
    if requested is Precision.auto:
        if target != "cuda":
            return Precision.fp32
        return Precision.bf16 if machine.bf16 else Precision.fp16
    if requested is Precision.bf16 and target == "cuda" and not machine.bf16:
        raise ConfigError("trainer.precision=bf16 but this CUDA device has no bf16 support; use fp16 (or auto)")
    return requested


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
