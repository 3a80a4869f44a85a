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
    patient_resample_weights,
    percentile_ci,
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


def _patient_split(rng, n_patients=60, n_labels=4):
    """Studies of patients (1-6 each, ids not 0..G-1), labels from very rare to common with a
    masked-out column, and scores rounded to make ties."""
    groups = np.repeat(rng.choice(10_000, n_patients, replace=False), rng.integers(1, 7, n_patients))
    n = len(groups)
    targets = (rng.random((n, n_labels)) < np.linspace(0.02, 0.4, n_labels)).astype(np.float32)
    mask = (rng.random((n, n_labels)) < 0.85).astype(np.float32)
    mask[:, 1] = 0  # a label never annotated: undefined in every resample
    probs = [np.round(np.clip(targets * 0.3 + rng.random((n, n_labels)), 0, 1), 1) for _ in range(2)]
    return groups, targets, mask, probs


def test_each_resample_draws_whole_patients_as_many_as_the_split_has():
    rng = np.random.default_rng(5)
    groups, *_ = _patient_split(rng)
    patients = np.unique(groups)
    chunks = list(patient_resample_weights(groups, 50, seed=9))
    weights = np.concatenate(chunks)
    assert weights.shape == (50, len(groups))
    for row in weights:
        per_patient = [np.unique(row[groups == g]) for g in patients]
        assert all(len(c) == 1 for c in per_patient), "a patient's studies are drawn together"
        assert sum(c[0] for c in per_patient) == len(patients)
    # the draws themselves: per resample one rng.integers over the sorted patient ids, as
    # evaluation.seed has always meant (results of earlier evaluations stay reproducible)
    rng = np.random.default_rng(9)
    for row in weights:
        drawn = patients[rng.integers(0, len(patients), len(patients))]
        counts = {g: int((drawn == g).sum()) for g in patients}
        np.testing.assert_array_equal(row, [counts[g] for g in groups])
    again = np.concatenate(list(patient_resample_weights(groups, 50, seed=9)))
    np.testing.assert_array_equal(weights, again)
    assert not np.array_equal(weights, np.concatenate(list(patient_resample_weights(groups, 50, seed=10))))


@pytest.mark.parametrize("chunk_elements", [1, 1000, 4_000_000])
def test_bootstrap_mean_auroc_is_sklearns_mean_auroc_on_the_resampled_studies(monkeypatch, chunk_elements):
    """Each resample's mean AUROC against scikit-learn on the explicitly resampled rows (a study drawn
    twice appears twice), over labels with both classes among the resample's valid rows: ties, a
    label defined in only some resamples and one never defined; chunks of one row to all at once."""
    from mdfnet_hydra.evaluation import stats

    monkeypatch.setattr(stats, "BOOTSTRAP_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(6)
    groups, targets, mask, probs = _patient_split(rng)
    n_boot = 40
    samples = bootstrap_mean_auroc(probs, targets, mask, groups, n_boot=n_boot, seed=2)
    weights = np.concatenate(list(patient_resample_weights(groups, n_boot, seed=2)))
    rare_defined = []
    for b in range(n_boot):
        rows = np.repeat(np.arange(len(groups)), weights[b].astype(int))
        for k, p in enumerate(probs):
            values = []
            for j in range(targets.shape[1]):
                valid = rows[mask[rows, j] > 0]
                y = targets[valid, j]
                if 0 < y.sum() < len(y):
                    values.append(roc_auc_score(y, p[valid, j]))
                    rare_defined.append(j == 0)
            assert samples[b, k] == pytest.approx(np.mean(values), abs=1e-12)
    assert any(rare_defined) and not all(rare_defined), "the rare label is defined in some resamples only"


def test_a_resample_without_any_defined_label_is_nan():
    targets = np.array([[1.0], [0.0], [1.0]])
    mask = np.ones_like(targets)
    probs = np.array([[0.9], [0.1], [0.8]])
    groups = np.array([0, 1, 2])
    samples = bootstrap_mean_auroc([probs], targets, mask, groups, n_boot=200, seed=0)[:, 0]
    weights = np.concatenate(list(patient_resample_weights(groups, 200, seed=0)))
    one_class = (weights[:, 1] == 0) | (weights[:, [0, 2]].sum(axis=1) == 0)
    assert one_class.any() and not one_class.all()
    assert np.isnan(samples[one_class]).all()
    assert (samples[~one_class] == 1.0).all()


def test_the_evaluation_cost_benchmark_times_each_part_and_agrees_with_its_reference(capsys):
    import re

    from mdfnet_hydra.benchmarks.evaluation_cost import main

    assert main(["--cases", "400", "--patients", "150", "--runs", "3", "--n-bootstrap", "30"]) == 0
    out = capsys.readouterr().out
    assert "evaluation of 3 runs, 1 comparisons" in out
    for part in ("per run (analyse):", "per comparison (compare_to_vision):"):
        assert re.search(re.escape(part) + r"\s+[0-9.]+ s", out), part
    assert float(re.search(r"largest difference ([0-9.e+-]+)", out).group(1)) < 1e-12


def _analysed(name, modalities, preds, n_boot=60, seed=4):
    from pathlib import Path

    from mdfnet_hydra.evaluation.analysis import analyse
    from mdfnet_hydra.evaluation.runs import Run

    run = Run(name, Path(name), "stage2", modalities, {}, seed=0)
    return analyse(run, preds, preds, "youden", 0.9, n_boot, seed)


@pytest.mark.parametrize("same_labels", [True, False])
def test_a_comparison_is_the_joint_paired_bootstrap_of_both_runs(same_labels):
    """compare_to_vision's mean-AUROC difference CI and p-value against both runs resampled together
    on the same cases (the multimodal run's cases in another order). Where the runs' labels differ
    (another label policy) both are resampled on the multimodal run's labels, as before."""
    from mdfnet_hydra.evaluation.analysis import compare_to_vision
    from mdfnet_hydra.evaluation.runs import aligned
    from mdfnet_hydra.predictions import Predictions

    rng = np.random.default_rng(8)
    groups, targets, mask, (probs_a, probs_b) = _patient_split(rng, n_patients=80, n_labels=14)
    ids = np.array([f"s{i:04d}" for i in range(len(groups))])
    vision = Predictions(probs_a, targets, mask, ids, groups)
    order = rng.permutation(len(groups))
    other_targets = targets if same_labels else np.where(rng.random(targets.shape) < 0.1, 1 - targets, targets)
    full = Predictions(probs_b[order], other_targets[order], mask[order], ids[order], groups[order])
    results = [_analysed("v", ["vision"], vision), _analysed("a", ["vision", "text"], full)]
    (comparison,), _ = compare_to_vision(results, 60, 4)
    mine, theirs = aligned(full, vision)
    joint = bootstrap_mean_auroc([mine.probs, theirs.probs], mine.targets, mine.mask, mine.group, 60, 4)
    differences = joint[:, 0] - joint[:, 1]
    np.testing.assert_allclose(comparison.mean_ci, np.percentile(differences, [2.5, 97.5]), atol=1e-12)
    assert comparison.mean_p == pytest.approx(bootstrap_p_value(differences), abs=1e-12)
    reused = results[1].mean_samples - results[0].mean_samples
    assert np.allclose(reused, differences, atol=1e-12) == same_labels


def test_without_a_defined_resample_the_interval_and_p_value_are_empty_not_an_error():
    nan = np.full(20, np.nan)
    assert all(np.isnan(percentile_ci(nan)))
    assert bootstrap_p_value(nan) is None
    assert percentile_ci(np.r_[nan, 0.5, 0.7]) == pytest.approx((0.505, 0.695))


def test_a_positive_is_a_target_above_one_half_everywhere():
    y = np.array([0.0, 1.0, 0.0, 1.0])
    scores = np.array([0.1, 0.8, 0.4, 0.3])
    assert fast_auroc(y, scores) == pytest.approx(roc_auc_score(y, scores))
    assert fast_auroc(y == 1, scores) == fast_auroc(y, scores)
    assert fast_auroc(np.array([0.0, 0.2, 0.0, 0.2]), scores) is None  # no target above 0.5
