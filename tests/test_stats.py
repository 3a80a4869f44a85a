"""DeLong and the bootstrap against brute-force references and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mdfnet_hydra.evaluation.stats import (
    auroc_ci,
    bootstrap_mean_auroc,
    bootstrap_p_value,
    delong,
    delong_test,
    fast_auroc,
    mean_auroc,
)


def brute_force_delong(y, scores):
    """DeLong's structural components by explicit pairwise comparison (O(k m n))."""
    y = np.asarray(y).astype(bool)
    k = scores.shape[0]
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])  # (k, m, n)
    aucs = psi.mean(axis=(1, 2))
    v10 = psi.mean(axis=2)  # per positive
    v01 = psi.mean(axis=1)  # per negative
    s10 = np.array([[np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1) for b in range(k)] for a in range(k)])
    s01 = np.array([[np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1) for b in range(k)] for a in range(k)])
    return aucs, s10 / m + s01 / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(60) < 0.3
    scores = np.round(np.vstack([y * 0.8 + rng.random(60), y * 0.3 + rng.random(60)]), 1)  # rounding makes ties
    aucs, cov = delong(y, scores)
    ref_aucs, ref_cov = brute_force_delong(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    assert aucs[0] == pytest.approx(roc_auc_score(y, scores[0]))
    assert fast_auroc(y, scores[1]) == pytest.approx(roc_auc_score(y, scores[1]))


def test_delong_worked_example():
    """Hand-computed: positives (0.9, 0.6), negatives (0.5, 0.6, 0.2).
    psi rows: [1, 1, 1] and [1, 0.5, 1] -> AUC 5.5/6; V10 = (1, 5/6); V01 = (1, 0.75, 1);
    S10 = var(1, 5/6) = 1/72; S01 = var(1, .75, 1) = 1/48; Var = (1/72)/2 + (1/48)/3 = 1/144 + 1/144."""
    y = np.array([1, 1, 0, 0, 0])
    s = np.array([0.9, 0.6, 0.5, 0.6, 0.2])
    aucs, cov = delong(y, s)
    assert aucs[0] == pytest.approx(5.5 / 6)
    assert cov[0, 0] == pytest.approx(2 / 144)
    auc, low, high = auroc_ci(y, s)
    assert low == pytest.approx(5.5 / 6 - 1.959964 * (2 / 144) ** 0.5, abs=1e-6) and high == 1.0


def test_paired_test_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.3
    good = y * 1.5 + rng.normal(size=400)
    bad = y * 0.3 + rng.normal(size=400)
    strong = delong_test(y, good, bad)
    assert strong.difference > 0 and strong.p_value < 1e-4 and strong.ci_low > 0
    equally_good = y * 1.5 + rng.normal(size=400)
    null = delong_test(y, good, equally_good)
    assert null.p_value > 0.05 and null.ci_low < 0 < null.ci_high
    identical = delong_test(y, good, good)
    assert identical.difference == 0 and identical.p_value == 1.0


def test_patient_bootstrap_covers_the_estimate_and_resamples_whole_patients():
    rng = np.random.default_rng(4)
    n = 300
    targets = (rng.random((n, 3)) < 0.3).astype(float)
    mask = np.ones_like(targets)
    probs_a = np.clip(targets * 0.4 + rng.random((n, 3)) * 0.6, 0, 1)
    probs_b = rng.random((n, 3))
    groups = np.repeat(np.arange(100), 3)
    samples = bootstrap_mean_auroc([probs_a, probs_b], targets, mask, groups, n_boot=200, seed=0)
    point = mean_auroc(probs_a, targets, mask)
    low, high = np.percentile(samples[:, 0], [2.5, 97.5])
    assert low < point < high
    assert bootstrap_p_value(samples[:, 0] - samples[:, 1]) == pytest.approx(1 / 200)
    assert bootstrap_p_value(samples[:, 0] - samples[:, 0]) == 1.0
