"""Masked multi-label losses: BCE, sigmoid focal loss, and their weighted combination.

Every term is summed over valid (mask = 1) label slots and divided by the number of label slots in
the batch (batch x 14), masked slots counting as zero. A constant denominator keeps the loss of a
batch split across DDP ranks equal to the mean of the ranks' losses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mdfnet_hydra.config import LossConfig


class LossTerms(NamedTuple):
    """What a loss returns: the optimised total and its named terms, which the trainer logs as they
    come (`train/loss_<name>`, the epoch line), so a new loss adds terms here and nowhere else."""

    total: torch.Tensor  # what is optimised: bce_weight * bce + focal_weight * focal
    parts: dict[str, torch.Tensor]


def focal_elementwise(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.): alpha_t (1 - p_t)^gamma BCE; alpha < 0 disables weighting."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def describe_loss(cfg: LossConfig) -> str:
    """The loss as it is computed: the effective weights (focal_weight null is 1 - bce_weight) and
    the focal parameters where a focal term counts."""
    bce = float(cfg.bce_weight)
    focal = float(cfg.focal_weight) if cfg.focal_weight is not None else 1.0 - bce
    focal_params = f"focal alpha {float(cfg.focal_alpha):g}, gamma {float(cfg.focal_gamma):g}"
    if not bce:
        return f"{focal:g} x focal ({focal_params})"
    return f"{bce:g} x bce + {focal:g} x focal ({focal_params})" if focal else f"{bce:g} x bce"


class MultiLabelLoss(nn.Module):
    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.bce_weight = float(cfg.bce_weight)
        self.focal_weight = float(cfg.focal_weight) if cfg.focal_weight is not None else 1.0 - self.bce_weight
        self.alpha = float(cfg.focal_alpha)
        self.gamma = float(cfg.focal_gamma)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> LossTerms:
        logits = logits.float()
        denominator = float(targets.numel())
        bce = (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * mask).sum() / denominator
        focal = (focal_elementwise(logits, targets, self.alpha, self.gamma) * mask).sum() / denominator
        return LossTerms(self.bce_weight * bce + self.focal_weight * focal, {"bce": bce, "focal": focal})
