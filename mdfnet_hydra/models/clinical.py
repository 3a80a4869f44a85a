"""Dense encoder of the ED triage vector (standardised features + missing indicators)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ClinicalEncoder(nn.Module):
    """MLP with LayerNorm (not BatchNorm: DDP-safe and batch-size independent)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden_dims:
            layers += [nn.Linear(prev, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout)]
            prev = width
        self.net = nn.Sequential(*layers)
        self.out_dim = prev

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).unsqueeze(1)
