"""Losses against independent references: a NumPy BCE and torchvision's sigmoid focal loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from mdfnet_hydra.config import LossConfig
from mdfnet_hydra.losses import MultiLabelLoss


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 14, generator=g) * 3
    targets = (torch.rand(8, 14, generator=g) > 0.7).float()
    mask = (torch.rand(8, 14, generator=g) > 0.3).float()
    return logits, targets, mask


def numpy_bce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return -(targets * np.log(p) + (1 - targets) * np.log(1 - p))


def test_bce_matches_numpy_formula_over_valid_slots(batch):
    logits, targets, mask = batch
    terms = MultiLabelLoss(LossConfig(bce_weight=1.0, focal_weight=0.0))(logits, targets, mask)
    expected = (numpy_bce(logits.numpy(), targets.numpy()) * mask.numpy()).sum() / targets.numel()
    assert terms.parts["bce"].item() == pytest.approx(expected, rel=1e-5)
    assert terms.total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.5), (-1.0, 0.0)])
def test_focal_matches_torchvision(batch, alpha, gamma):
    logits, targets, mask = batch
    cfg = LossConfig(bce_weight=0.0, focal_weight=1.0, focal_alpha=alpha, focal_gamma=gamma)
    terms = MultiLabelLoss(cfg)(logits, targets, mask)
    reference = (
        sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none") * mask
    ).sum() / targets.numel()
    assert terms.parts["focal"].item() == pytest.approx(reference.item(), rel=1e-5)


def test_combined_is_the_weighted_sum(batch):
    logits, targets, mask = batch
    terms = MultiLabelLoss(LossConfig())(logits, targets, mask)  # spec: 0.7 BCE + 0.3 focal(0.25, 2)
    assert terms.total.item() == pytest.approx(
        0.7 * terms.parts["bce"].item() + 0.3 * terms.parts["focal"].item(), rel=1e-6
    )


def test_masked_slots_do_not_contribute(batch):
    logits, targets, mask = batch
    loss = MultiLabelLoss(LossConfig())
    scrambled = torch.where(mask > 0, targets, 1 - targets)
    changed_logits = torch.where(mask > 0, logits, logits * -5)
    assert loss(logits, targets, mask).total.item() == pytest.approx(loss(changed_logits, scrambled, mask).total.item())
