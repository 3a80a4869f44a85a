"""Optimizer with discriminative learning rates and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch

from mdfnet_hydra.config import OptimizerConfig, OptimizerName, PhaseConfig, SchedulerConfig
from mdfnet_hydra.models.mdfnet import MDFNet


def group_learning_rates(phase: PhaseConfig) -> dict[str, float]:
    return {
        "encoders": phase.lr_encoders,
        "fusion": phase.lr_fusion if phase.lr_fusion is not None else phase.lr,
        "head": phase.lr_head if phase.lr_head is not None else phase.lr,
    }


def describe_optimizer_config(cfg: OptimizerConfig) -> str:
    """The optimizer with the settings build_optimizer passes it (learning rates are per stage)."""
    if cfg.name is OptimizerName.adamw:
        betas = ", ".join(format(float(b), "g") for b in cfg.betas)
        return f"adamw (betas ({betas}), eps {float(cfg.eps):g}, weight decay {float(cfg.weight_decay):g})"
    return (
        f"sgd (momentum {float(cfg.momentum):g}{', nesterov' if cfg.nesterov else ''}, "
        f"weight decay {float(cfg.weight_decay):g})"
    )


def build_optimizer(
    model: MDFNet, phase: PhaseConfig, cfg: OptimizerConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """One parameter group per part (named in `group["name"]`), frozen parameters left out.
    `fused`: AdamW's single-kernel step (`Runtime.fused_optimizer`: a CUDA machine's choice; torch
    also runs it on CPU)."""
    lrs = group_learning_rates(phase)
    groups = []
    for name, params in model.parameter_groups().items():
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            groups.append({"name": name, "params": trainable, "lr": lrs[name]})
    if cfg.name is OptimizerName.adamw:
        return torch.optim.AdamW(
            groups, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None
        )
    return torch.optim.SGD(
        groups, lr=groups[0]["lr"], momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step factor: linear from warmup_start_factor to 1 over warmup_steps, then cosine to min_lr_ratio."""
    start, floor = cfg.warmup_start_factor, cfg.min_lr_ratio
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start + (1.0 - start) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
