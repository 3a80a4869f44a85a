"""Turn raw CheXpert values (1, 0, -1, blank) into training targets and a validity mask."""

from __future__ import annotations

import numpy as np

from mdfnet_hydra.config import BlankPolicy, UncertainPolicy


def encode_targets(
    raw: np.ndarray, uncertain: UncertainPolicy | str, blank: BlankPolicy | str
) -> tuple[np.ndarray, np.ndarray]:
    """Return (targets, mask), both (N, 14) float32.

    Masked entries (mask 0) are left out of the loss and of every metric; their target is 0.
    """
    uncertain = UncertainPolicy(uncertain)
    blank = BlankPolicy(blank)
    targets = np.zeros_like(raw, dtype=np.float32)
    mask = np.ones_like(raw, dtype=np.float32)
    targets[raw == 1.0] = 1.0
    is_uncertain = raw == -1.0
    if uncertain is UncertainPolicy.ones:
        targets[is_uncertain] = 1.0
    elif uncertain is UncertainPolicy.ignore:
        mask[is_uncertain] = 0.0
    if blank is BlankPolicy.mask:
        mask[np.isnan(raw)] = 0.0
    return targets, mask
