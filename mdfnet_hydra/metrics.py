"""Validation / test metrics over masked multi-label predictions.

A label whose evaluated entries hold no positive or no negative has no AUROC: it is reported as
undefined (None) and left out of every mean, never counted as 0 or NaN (torchmetrics' multilabel
AUROC would give it 0). Per-label values use torchmetrics' binary functions on the valid entries.
Probabilities that are NaN or infinite (a diverged model) are refused: torchmetrics would turn them
into an arbitrary AUROC (about 0.5 for all-NaN scores) that reads like a result.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_f1_score

from mdfnet_hydra.labels import CHEXPERT_LABELS


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def compute_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    mask: np.ndarray,
    threshold: float = 0.5,
    rare: Sequence[int] = (),
    labels: Sequence[str] = CHEXPERT_LABELS,
) -> dict:
    p = torch.as_tensor(probs, dtype=torch.float64)
    bad = int((~torch.isfinite(p)).sum())
    if bad:
        raise ValueError(
            f"compute_metrics: {bad} of {p.numel()} probabilities are NaN or infinite (a diverged model's "
            "predictions); no metric is defined on them"
        )
    t = torch.as_tensor(targets).round().long()
    valid = torch.as_tensor(mask) > 0
    auroc: dict[str, Optional[float]] = {}
    auprc: dict[str, Optional[float]] = {}
    f1: dict[str, Optional[float]] = {}
    positives: dict[str, int] = {}
    negatives: dict[str, int] = {}
    for j, name in enumerate(labels):
        pj, tj = p[valid[:, j], j], t[valid[:, j], j]
        n_pos = int(tj.sum())
        n_neg = int(len(tj) - n_pos)
        positives[name], negatives[name] = n_pos, n_neg
        defined = n_pos > 0 and n_neg > 0
        auroc[name] = float(binary_auroc(pj, tj)) if defined else None
        auprc[name] = float(binary_average_precision(pj, tj)) if defined else None
        f1[name] = float(binary_f1_score(pj, tj, threshold=threshold)) if n_pos > 0 else None

    flat_p, flat_t = p[valid], t[valid]
    micro_defined = flat_t.numel() > 0 and 0 < int(flat_t.sum()) < flat_t.numel()
    undefined = [name for name in labels if auroc[name] is None]
    return {
        "auroc_mean": _mean(list(auroc.values())),
        "auroc_micro": float(binary_auroc(flat_p, flat_t)) if micro_defined else None,
        "auroc_min": min((v for v in auroc.values() if v is not None), default=None),
        "auroc_rare": _mean([auroc[labels[j]] for j in rare]),
        "auprc_mean": _mean(list(auprc.values())),
        "f1_macro": _mean(list(f1.values())),
        "f1_micro": float(binary_f1_score(flat_p, flat_t, threshold=threshold)) if flat_t.numel() else None,
        "auroc": auroc,
        "auprc": auprc,
        "f1": f1,
        "positives": positives,
        "negatives": negatives,
        "undefined_labels": undefined,
        "threshold": threshold,
    }


def rarest_labels(targets: np.ndarray, mask: np.ndarray, k: int, labels: Sequence[str] = CHEXPERT_LABELS) -> list[int]:
    """Indices of the k labels with the fewest positives in a split (the training split)."""
    positives = (targets * mask).sum(axis=0)
    order = np.argsort(positives, kind="stable")
    return [int(j) for j in order[:k]]
