"""Metrics against scikit-learn, and undefined labels kept out of the means."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from mdfnet_hydra.labels import CHEXPERT_LABELS
from mdfnet_hydra.metrics import compute_metrics, rarest_labels


def random_predictions(seed: int = 0, n: int = 200):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 14)) < np.linspace(0.05, 0.5, 14)).astype(np.float32)
    probs = np.clip(targets * 0.3 + rng.random((n, 14)) * 0.7, 0, 1).astype(np.float32)
    mask = (rng.random((n, 14)) > 0.2).astype(np.float32)
    return probs, targets, mask


def test_per_label_and_mean_metrics_match_sklearn():
    probs, targets, mask = random_predictions()
    m = compute_metrics(probs, targets, mask, threshold=0.5)
    aurocs, auprcs, f1s = [], [], []
    for j, name in enumerate(CHEXPERT_LABELS):
        v = mask[:, j] > 0
        aurocs.append(roc_auc_score(targets[v, j], probs[v, j]))
        auprcs.append(average_precision_score(targets[v, j], probs[v, j]))
        f1s.append(f1_score(targets[v, j], probs[v, j] >= 0.5))
        assert m["auroc"][name] == pytest.approx(aurocs[-1], abs=1e-6)
        assert m["auprc"][name] == pytest.approx(auprcs[-1], abs=1e-6)
        assert m["f1"][name] == pytest.approx(f1s[-1], abs=1e-6)
    assert m["auroc_mean"] == pytest.approx(np.mean(aurocs), abs=1e-6)
    assert m["auprc_mean"] == pytest.approx(np.mean(auprcs), abs=1e-6)
    assert m["f1_macro"] == pytest.approx(np.mean(f1s), abs=1e-6)
    valid = mask > 0
    assert m["auroc_micro"] == pytest.approx(roc_auc_score(targets[valid], probs[valid]), abs=1e-6)
    assert m["f1_micro"] == pytest.approx(f1_score(targets[valid], probs[valid] >= 0.5), abs=1e-6)
    assert m["auroc_min"] == pytest.approx(min(aurocs), abs=1e-6)


def test_label_without_positives_is_undefined_not_zero():
    probs, targets, mask = random_predictions(1)
    fracture = CHEXPERT_LABELS.index("Fracture")
    edema = CHEXPERT_LABELS.index("Edema")
    targets[:, fracture] = 0  # no positives
    targets[:, edema] = 1  # no negatives
    m = compute_metrics(probs, targets, mask)
    assert m["auroc"]["Fracture"] is None and m["auroc"]["Edema"] is None
    assert set(m["undefined_labels"]) == {"Fracture", "Edema"}
    defined = [
        roc_auc_score(targets[mask[:, j] > 0, j], probs[mask[:, j] > 0, j])
        for j in range(14)
        if j not in (fracture, edema)
    ]
    assert m["auroc_mean"] == pytest.approx(np.mean(defined), abs=1e-6)
    assert m["f1"]["Fracture"] is None  # F1 needs a positive to be meaningful


def test_masked_entries_are_ignored():
    probs, targets, mask = random_predictions(2)
    flipped = np.where(mask > 0, targets, 1 - targets)
    assert compute_metrics(probs, targets, mask)["auroc"] == compute_metrics(probs, flipped, mask)["auroc"]


def test_rare_mean_and_rarest_labels():
    probs, targets, mask = random_predictions(3)
    rare = rarest_labels(targets, mask, 3)
    counts = (targets * mask).sum(0)
    assert sorted(counts[rare]) == sorted(np.sort(counts)[:3])
    m = compute_metrics(probs, targets, mask, rare=rare)
    assert m["auroc_rare"] == pytest.approx(np.mean([m["auroc"][CHEXPERT_LABELS[j]] for j in rare]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_probabilities_are_refused_not_scored(bad):
    """torchmetrics turns NaN scores into an arbitrary AUROC (0.472 for all-NaN ones), which read as a
    result; the evaluation package computes its metrics here too."""
    probs, targets, mask = random_predictions(2)
    probs[5, 3] = bad
    with pytest.raises(ValueError, match=r"1 of 2800 probabilities are NaN or infinite"):
        compute_metrics(probs, targets, mask)
    with pytest.raises(ValueError, match=r"2800 of 2800 probabilities are NaN or infinite"):
        compute_metrics(np.full_like(probs, np.nan), targets, mask)
