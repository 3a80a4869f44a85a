"""DeLong and the bootstrap against brute-force references and scikit-learn."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from mdfnet_hydra.evaluation.stats import (
    auroc_ci,
    bootstrap_mean_auroc,
    bootstrap_p_value,
    delong,
    delong_test,
    fast_auroc,
    holm,
    mean_auroc,
    patient_resample_weights,
    percentile_ci,
    t_quantile,
    t_two_sided_p,
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


def brute_force_clustered_delong(y, scores, groups):
    """Obuchowski's (1997) clustered covariance written out: per patient i the sums of the positives'
    and the negatives' components, centred on m_i * AUC and n_i * AUC;
    S10 = I10 / ((I10 - 1) M) sum_i d10_i d10_i' over the I10 patients with a positive,
    S01 = I01 / ((I01 - 1) N) sum_i d01_i d01_i' over the I01 with a negative,
    S11 = I / (I - 1) sum_i d10_i d01_i'; covariance S10 / M + S01 / N + (S11 + S11') / (M N)."""
    y = np.asarray(y).astype(bool)
    k = scores.shape[0]
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    aucs = psi.mean(axis=(1, 2))
    patients = sorted(set(groups.tolist()))
    big_i = len(patients)
    i10 = len(set(groups[y].tolist()))
    i01 = len(set(groups[~y].tolist()))
    d10 = np.zeros((k, big_i))
    d01 = np.zeros((k, big_i))
    for i, patient in enumerate(patients):
        mine_pos = groups[y] == patient
        mine_neg = groups[~y] == patient
        for r in range(k):
            d10[r, i] = psi[r].mean(axis=1)[mine_pos].sum() - mine_pos.sum() * aucs[r]
            d01[r, i] = psi[r].mean(axis=0)[mine_neg].sum() - mine_neg.sum() * aucs[r]
    cov = np.zeros((k, k))
    for a in range(k):
        for b in range(k):
            s10 = i10 / ((i10 - 1) * m) * np.sum(d10[a] * d10[b])
            s01 = i01 / ((i01 - 1) * n) * np.sum(d01[a] * d01[b])
            s11 = big_i / (big_i - 1) * (np.sum(d10[a] * d01[b]) + np.sum(d10[b] * d01[a]))
            cov[a, b] = s10 / m + s01 / n + s11 / (m * n)
    return aucs, cov


def _clustered_split(rng, n_patients=150):
    """Studies of patients (1-6 each) where findings persist within a patient (a patient with the
    condition is positive on 85% of studies, one without on 5%) and every score carries the patient's
    own offset: studies of one patient are far from independent, as in a real test split."""
    per = rng.integers(1, 7, n_patients)
    groups = np.repeat(np.arange(n_patients), per)
    condition = np.repeat(rng.random(n_patients) < 0.3, per)
    y = rng.random(len(groups)) < np.where(condition, 0.85, 0.05)
    offset = lambda: np.repeat(rng.normal(size=n_patients), per)  # noqa: E731
    return groups, y, offset


@pytest.mark.parametrize("seed", [0, 1])
def test_clustered_delong_matches_obuchowskis_formula_written_out(seed):
    """Tied scores, patient ids that are not 0..I-1, patients with only positives or only negatives."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(rng.choice(10_000, 40, replace=False), rng.integers(1, 6, 40))
    y = rng.random(len(groups)) < 0.35
    scores = np.round(np.vstack([y * 0.8 + rng.random(len(y)), y * 0.3 + rng.random(len(y))]), 1)
    aucs, cov = delong(y, scores, groups)
    ref_aucs, ref_cov = brute_force_clustered_delong(y, scores, groups)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    test = delong_test(y, scores[0], scores[1], groups)
    assert test.difference == pytest.approx(ref_aucs[0] - ref_aucs[1])
    se = (ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]) ** 0.5
    df = min(len(set(groups[y])), len(set(groups[~y]))) - 1  # patients with a positive / a negative
    assert test.ci_high - test.ci_low == pytest.approx(2 * scipy_stats.t.ppf(0.975, df) * se, rel=1e-9)
    assert test.p_value == pytest.approx(2 * scipy_stats.t.sf(abs(test.difference) / se, df), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_study_per_patient_gives_delongs_covariance_exactly(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(50) < 0.3
    scores = np.round(np.vstack([y * 0.8 + rng.random(50), y * 0.3 + rng.random(50)]), 1)
    np.testing.assert_allclose(delong(y, scores, rng.permutation(50) + 7)[1], delong(y, scores)[1], atol=1e-15)


def test_clustered_delong_worked_example():
    """Hand-computed. Patient A: a positive 0.9 and a negative 0.2; B: a positive 0.4 and a negative
    0.5; C: a negative 0.1. The positives outrank (3, 2) of the 3 negatives: AUC = 5/6, components
    (1, 2/3); the negatives are outranked by (2, 1, 2) of 2: components (1, 1/2, 1). Centred patient
    sums: positives A 1/6, B -1/6, C 0; negatives A 1/6, B -1/3, C 1/6. With I10 = 2, I01 = I = 3:
    S10 = 2/(1*2) * 2/36 = 1/18, S01 = 3/(2*3) * 6/36 = 1/12, S11 = 3/2 * (1/36 + 1/18) = 1/8;
    Var = (1/18)/2 + (1/12)/3 + 2 (1/8)/6 = 7/72."""
    y = np.array([1, 0, 1, 0, 0])
    s = np.array([0.9, 0.2, 0.4, 0.5, 0.1])
    aucs, cov = delong(y, s, np.array([0, 0, 1, 1, 2]))
    assert aucs[0] == pytest.approx(5 / 6) and cov[0, 0] == pytest.approx(7 / 72)
    # two patients hold a positive: t with 1 degree of freedom (12.71), the interval clipped to [0, 1]
    _, low, high = auroc_ci(y, s, np.array([0, 0, 1, 1, 2]))
    assert (low, high) == (0.0, 1.0)


def test_without_two_patients_on_each_side_there_is_no_interval():
    """Every positive (or negative) from one patient: that side's variance cannot be estimated
    (its one summed component is centred to zero), so there is no interval, not a narrow one."""
    y = np.array([1, 0, 1, 0, 0, 0])
    s = np.array([0.9, 0.1, 0.4, 0.6, 0.3, 0.2])
    other = np.array([0.5, 0.1, 0.4, 0.6, 0.3, 0.2])
    for groups in (np.zeros(6), np.array([0, 0, 0, 1, 2, 3]), np.array([0, 1, 2, 1, 1, 1])):
        auc, low, high = auroc_ci(y, s, groups)
        assert auc == pytest.approx(0.875) and np.isnan(low) and np.isnan(high), groups
        assert np.isnan(delong_test(y, s, other, groups).p_value)
    assert not np.isnan(auroc_ci(y, s, np.array([0, 0, 1, 1, 2, 2]))[1])


def test_clustered_intervals_cover_the_true_auroc_and_the_paired_test_keeps_its_level():
    """400 simulated test splits of clustered studies (_clustered_split): score = label + the
    patient's offset + noise, so the true AUROC is Phi(1 / sqrt(2 * 1.25)). Clustered 95% intervals
    cover it about 95% of the time, DeLong's per-study ones far less; two equally good models whose
    patient offsets differ are called different about 5% of the time clustered, far more per study."""
    from statistics import NormalDist

    truth = NormalDist().cdf(1 / (2 * 1.25) ** 0.5)
    rng = np.random.default_rng(0)
    covered = {"clustered": 0, "per study": 0}
    rejected = {"clustered": 0, "per study": 0}
    repeats = 400
    for _ in range(repeats):
        groups, y, offset = _clustered_split(rng)
        a = y + offset() + 0.5 * rng.normal(size=len(y))
        b = y + offset() + 0.5 * rng.normal(size=len(y))
        for name, g in (("clustered", groups), ("per study", None)):
            _, low, high = auroc_ci(y, a, g)
            covered[name] += low <= truth <= high
            rejected[name] += delong_test(y, a, b, g).p_value < 0.05
    coverage = {k: v / repeats for k, v in covered.items()}
    level = {k: v / repeats for k, v in rejected.items()}
    assert 0.92 <= coverage["clustered"] <= 0.975, coverage
    assert coverage["per study"] < 0.82, coverage
    assert level["clustered"] <= 0.08 and level["per study"] > 0.15, level


def test_the_clustered_variance_is_the_patient_bootstraps():
    """An independent estimate of the same variance: one label's AUROC over 2,000 patient-level
    resamples (the bootstrap tested above against scikit-learn)."""
    rng = np.random.default_rng(1)
    groups, y, offset = _clustered_split(rng, n_patients=400)
    scores = y + offset() + 0.5 * rng.normal(size=len(y))
    samples = bootstrap_mean_auroc([scores[:, None]], y[:, None].astype(float), np.ones((len(y), 1)), groups, 2000, 0)
    bootstrap_var = np.var(samples[:, 0], ddof=1)
    assert delong(y, scores, groups)[1][0, 0] / bootstrap_var == pytest.approx(1, abs=0.15)
    assert delong(y, scores)[1][0, 0] / bootstrap_var < 0.7, "per-study DeLong understates it"


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
    assert (low, high) == (0.0, 1.0), "t with 1 degree of freedom: 5.5/6 -+ 12.71 * 0.118"
    # by hand: positives (0.9, 0.8, 0.6), negatives (0.5, 0.6, 0.2, 0.3): AUC 11.5/12 = 23/24;
    # V10 = (1, 1, 7/8), S10 = 1/192; V01 = (1, 5/6, 1, 1), S01 = 1/144; Var = 1/576 + 1/576 = 1/288;
    # 3 positives: t with 2 degrees of freedom, quantile 4.302653
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.5, 0.6, 0.2, 0.3])
    auc, low, high = auroc_ci(y, s)
    assert auc == pytest.approx(23 / 24) and low == pytest.approx(23 / 24 - 4.302653 * (1 / 288) ** 0.5, abs=1e-6)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 30, 300, 5000, 2.5])
def test_students_t_matches_scipy(df):
    """The t reference of the intervals and tests (written out: scipy is not a run-time dependency)."""
    for t in (0.0, 1e-9, 0.1, 1.0, 1.96, -2.5, 4.0, 12.0, 60.0, 1e4):
        assert t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(abs(t), df), rel=1e-8, abs=1e-300)
    assert t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)
    assert np.isnan(t_two_sided_p(1.0, 0)) and np.isnan(t_quantile(0))


def test_students_t_where_the_continued_fraction_changes_side():
    """At x = (a + 1) / (a + b + 2) within rounding, x and 1 - x each looked like the far side:
    the first version swapped back and forth until RecursionError (found by review)."""
    assert t_two_sided_p(1.6383560438182505, 17) == pytest.approx(
        2 * scipy_stats.t.sf(1.6383560438182505, 17), rel=1e-9
    )
    for df in (1, 2, 17, 39, 51, 1_000_000):
        edge = (df * 1.5 / (df / 2 + 1)) ** 0.5
        for t in np.nextafter(edge, np.array([0.0, 10.0])).tolist() + [edge]:
            assert t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-8)


def _few_patient_split(rng, positive_patients, n_patients=150):
    """Studies of patients (1-6 each) where only `positive_patients` patients have the finding (each
    on at least one study, 85% of their studies): a rare label."""
    per = rng.integers(1, 7, n_patients)
    groups = np.repeat(np.arange(n_patients), per)
    ill = np.zeros(n_patients, dtype=bool)
    ill[rng.choice(n_patients, positive_patients, replace=False)] = True
    y = np.repeat(ill, per) & (rng.random(len(groups)) < 0.85)
    y[np.searchsorted(groups, np.flatnonzero(ill))] = True  # each ill patient's first study
    offset = lambda: np.repeat(rng.normal(size=n_patients), per)  # noqa: E731
    return groups, y, offset


@pytest.mark.parametrize("positive_patients", [3, 5])
def test_with_few_positive_patients_the_paired_test_keeps_its_level(positive_patients):
    """400 simulated splits whose positives come from 3 (or 5) patients, two equally good models:
    with Student's t (2 or 4 degrees of freedom) the test calls them different at p < 0.05 about 5%
    of the time; the normal reference on the same statistics did 19% / 13% of the time."""
    rng = np.random.default_rng(positive_patients)
    repeats, rejected, normal_rejected = 400, 0, 0
    for _ in range(repeats):
        groups, y, offset = _few_patient_split(rng, positive_patients)
        a = y + offset() + 0.5 * rng.normal(size=len(y))
        b = y + offset() + 0.5 * rng.normal(size=len(y))
        test = delong_test(y, a, b, groups)
        rejected += test.p_value < 0.05
        z = abs(test.difference) / ((test.ci_high - test.ci_low) / (2 * t_quantile(positive_patients - 1)))
        normal_rejected += 2 * scipy_stats.norm.sf(z) < 0.05
    assert rejected / repeats <= 0.08, rejected / repeats
    assert normal_rejected / repeats >= 0.1, "the simulation is one where the normal reference is liberal"


def test_holm_adjusts_step_down_and_leaves_untested_labels_out():
    """By hand: 4 tested p-values, sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03,
    2 x 0.03 = 0.06, 1 x 0.04 = 0.04 raised to the earlier 0.06; the NaN (untested) is not counted."""
    adjusted = holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    np.testing.assert_allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adjusted[4])
    assert holm([0.5, 0.7, 0.9]) == [1.0, 1.0, 1.0] and holm([]) == []
    np.testing.assert_allclose(holm([0.3, 0.01, 0.2]), [0.4, 0.03, 0.4])
    assert holm([0.02, 0.02]) == [0.04, 0.04], "ties"


def test_holm_brings_the_familywise_error_of_14_null_labels_near_5_percent():
    """4,000 families of 14 independent null tests: some label at unadjusted p < 0.05 in about half of
    them (1 - 0.95^14 = 51%), at Holm-adjusted p < 0.05 in about 5%. (Bonferroni would pass this too:
    the test above, by hand, is the one that tells Holm's step-down from it.)"""
    rng = np.random.default_rng(0)
    families = rng.random((4000, 14))
    any_raw = (families < 0.05).any(axis=1).mean()
    any_holm = np.mean([min(holm(row)) < 0.05 for row in families])
    assert any_raw == pytest.approx(1 - 0.95**14, abs=0.03)
    assert 0.03 <= any_holm <= 0.065, any_holm


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


@pytest.mark.parametrize("same_seed", [True, False])
def test_a_comparison_is_the_joint_paired_bootstrap_of_both_runs(same_seed):
    """compare_to_vision's mean-AUROC difference CI and p-value against both runs resampled together
    on the same cases (the multimodal run's cases in another order). Where the baseline's own
    resamples are other draws (another bootstrap seed) both are resampled together instead."""
    from mdfnet_hydra.evaluation.analysis import compare_to_vision
    from mdfnet_hydra.evaluation.runs import aligned
    from mdfnet_hydra.predictions import Predictions

    rng = np.random.default_rng(8)
    groups, targets, mask, (probs_a, probs_b) = _patient_split(rng, n_patients=80, n_labels=14)
    ids = np.array([f"s{i:04d}" for i in range(len(groups))])
    vision = Predictions(probs_a, targets, mask, ids, groups)
    order = rng.permutation(len(groups))
    full = Predictions(probs_b[order], targets[order], mask[order], ids[order], groups[order])
    results = [_analysed("v", ["vision"], vision, seed=4 if same_seed else 5), _analysed("a", ["vision", "text"], full)]
    (comparison,), _ = compare_to_vision(results, 60, 4)
    mine, theirs = aligned(full, vision)
    joint = bootstrap_mean_auroc([mine.probs, theirs.probs], mine.targets, mine.mask, mine.group, 60, 4)
    differences = joint[:, 0] - joint[:, 1]
    np.testing.assert_allclose(comparison.mean_ci, np.percentile(differences, [2.5, 97.5]), atol=1e-12)
    assert comparison.mean_p == pytest.approx(bootstrap_p_value(differences), abs=1e-12)
    reused = results[1].mean_samples - results[0].mean_samples
    assert np.allclose(reused, differences, atol=1e-12) == same_seed


def test_runs_scored_against_other_labels_are_not_compared():
    """The same cases under another label policy (uncertain findings counted positive, blanks
    negative, instead of masked): each run's AUROC measures something else, so the pair is not
    compared and the notes say why; a baseline with the same labels is taken instead."""
    from mdfnet_hydra.evaluation.analysis import compare_to_vision
    from mdfnet_hydra.predictions import Predictions

    rng = np.random.default_rng(9)
    groups, targets, mask, (probs_a, probs_b) = _patient_split(rng, n_patients=80, n_labels=14)
    ids = np.array([f"s{i:04d}" for i in range(len(groups))])
    policy_ones = np.where(mask > 0, targets, 1.0)  # every masked entry scored, as a positive
    full = Predictions(probs_b, targets, mask, ids, groups)
    other_labels = _analysed("v_ones", ["vision"], Predictions(probs_a, policy_ones, np.ones_like(mask), ids, groups))
    comparisons, notes = compare_to_vision([other_labels, _analysed("a", ["vision", "text"], full)], 60, 4)
    assert comparisons == []
    (note,) = [n for n in notes if "to compare with" in n]
    assert note.startswith("a: no vision-only run on the same test set to compare with; not comparable: v_ones: ")
    assert "same test cases, but other targets or masks on" in note and "data.labels" in note
    same_labels = _analysed("v", ["vision"], Predictions(probs_a, targets, mask, ids, groups))
    (comparison,), notes = compare_to_vision(
        [other_labels, same_labels, _analysed("a", ["vision", "text"], full)], 60, 4
    )
    assert comparison.baseline == "v"
    assert any(n.startswith("a: compared with v; not comparable: v_ones: same test cases") for n in notes), notes


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


def test_per_label_intervals_and_tests_of_the_evaluation_are_clustered_by_patient():
    """analyse's per-label CI and compare_to_vision's per-label test use each study's patient."""
    from mdfnet_hydra.evaluation.analysis import compare_to_vision
    from mdfnet_hydra.labels import CHEXPERT_LABELS
    from mdfnet_hydra.predictions import Predictions

    rng = np.random.default_rng(2)
    groups, targets, mask, (probs_a, probs_b) = _patient_split(rng, n_patients=80, n_labels=14)
    ids = np.array([f"s{i:04d}" for i in range(len(groups))])
    vision = Predictions(probs_a, targets, mask, ids, groups)
    full = Predictions(probs_b, targets, mask, ids, groups)
    results = [_analysed("v", ["vision"], vision, n_boot=0), _analysed("a", ["vision", "text"], full, n_boot=0)]
    (comparison,), notes = compare_to_vision(results, 0, 4)

    def patients(j, positive):
        return len({g for g, t, k in zip(groups, targets[:, j], mask[:, j]) if (t > 0.5) == positive and k > 0})

    few = [
        name
        for j, name in enumerate(CHEXPERT_LABELS)
        if min(patients(j, True), patients(j, False)) > 0 and min(patients(j, True), patients(j, False)) < 10
    ]
    assert few and "Pleural Effusion" not in few
    assert notes == [
        f"a: the per-label tests of {', '.join(few)} rest on fewer than 10 patients with a positive (or with a "
        "negative): wide intervals, little power (docs/outputs.md, statistical choices)"
    ]
    j = CHEXPERT_LABELS.index("Pleural Effusion")
    valid = mask[:, j] > 0
    y = targets[valid, j] > 0.5
    clustered = auroc_ci(y, probs_a[valid, j], groups[valid])
    assert results[0].auroc["Pleural Effusion"] == pytest.approx(clustered, abs=1e-12)
    assert results[0].auroc["Pleural Effusion"] != pytest.approx(auroc_ci(y, probs_a[valid, j]), abs=1e-6)
    paired = delong_test(y, probs_b[valid, j], probs_a[valid, j], groups[valid])
    assert comparison.per_label["Pleural Effusion"].p_value == pytest.approx(paired.p_value, abs=1e-12)
    assert comparison.per_label["Pleural Effusion"].ci_low == pytest.approx(paired.ci_low, abs=1e-12)


def test_a_label_whose_positives_are_one_patients_has_no_interval_in_the_report(tmp_path):
    from mdfnet_hydra.evaluation.tables import markdown
    from mdfnet_hydra.labels import CHEXPERT_LABELS
    from mdfnet_hydra.predictions import Predictions

    rng = np.random.default_rng(3)
    groups, targets, mask, (probs, _) = _patient_split(rng, n_patients=40, n_labels=14)
    j = CHEXPERT_LABELS.index("Edema")
    targets[:, j] = groups == groups[0]  # Edema: the first patient's studies only
    mask[:, j] = 1
    ids = np.array([f"s{i:04d}" for i in range(len(groups))])
    result = _analysed("v", ["vision"], Predictions(probs, targets, mask, ids, groups), n_boot=0)
    assert np.isnan(result.auroc["Edema"][1])
    rows = markdown([result], [], [], [], [], tmp_path, "youden").splitlines()
    edema = next(line for line in rows if line.startswith("| Edema |"))
    assert edema == f"| Edema | {result.auroc['Edema'][0]:.3f} (no CI: one patient) |"
    effusion = next(line for line in rows if line.startswith("| Pleural Effusion |"))
    assert re.fullmatch(r"\| Pleural Effusion \| 0\.\d{3} \(0\.\d{3}-[01]\.\d{3}\) \|", effusion)


def test_results_md_counts_labels_better_and_worse_before_and_after_holm(tmp_path):
    """Three tested labels at p 0.003 (better), 0.03 (better) and 0.04 (worse): 2 / 1 unadjusted;
    Holm's 0.009, 0.06, 0.06 leave 1 / 0. The CSV carries both p-values per label."""
    from mdfnet_hydra.evaluation.analysis import Comparison
    from mdfnet_hydra.evaluation.stats import PairedTest
    from mdfnet_hydra.evaluation.tables import comparison_rows, markdown
    from mdfnet_hydra.labels import CHEXPERT_LABELS

    tests = {
        "Edema": PairedTest(0.8, 0.7, 0.1, 0.05, 0.15, 0.003),
        "Atelectasis": PairedTest(0.8, 0.75, 0.05, 0.01, 0.09, 0.03),
        "Pneumothorax": PairedTest(0.7, 0.75, -0.05, -0.09, -0.01, 0.04),
    }
    per_label = {name: tests.get(name) for name in CHEXPERT_LABELS}
    adjusted = dict(zip(tests, holm([t.p_value for t in tests.values()])))
    comparison = Comparison(
        "all/stage2", "vision/stage2", per_label, {n: adjusted.get(n) for n in per_label}, 0.02, (0.0, 0.04), 0.04
    )
    lines = markdown([], [comparison], [], [], [], tmp_path, "youden").splitlines()
    row = next(line for line in lines if line.startswith("| all/stage2 | vision/stage2 |"))
    assert [cell.strip() for cell in row.strip("|").split("|")][4:] == ["2 / 1", "1 / 0"]
    csv_rows = {r["label"]: r for r in comparison_rows([comparison])}
    assert (csv_rows["Edema (DeLong)"]["p_value"], csv_rows["Edema (DeLong)"]["p_holm"]) == ("0.003", "0.009")
    assert (csv_rows["Pneumothorax (DeLong)"]["p_value"], csv_rows["Pneumothorax (DeLong)"]["p_holm"]) == (
        "0.040",
        "0.060",
    )
    assert csv_rows["Fracture (DeLong)"]["p_holm"] == "" and csv_rows["mean AUROC (patient bootstrap)"]["p_holm"] == ""


def test_the_holm_family_of_a_comparison_is_its_labels_with_a_p_value():
    """A label held by one patient (a test without a p-value) and a label never annotated are left
    out of the family: the others are adjusted over the labels that have a p-value."""
    from mdfnet_hydra.evaluation.analysis import compare_to_vision
    from mdfnet_hydra.labels import CHEXPERT_LABELS
    from mdfnet_hydra.predictions import Predictions

    rng = np.random.default_rng(4)
    groups, targets, mask, (probs_a, probs_b) = _patient_split(rng, n_patients=80, n_labels=14)
    edema = CHEXPERT_LABELS.index("Edema")
    targets[:, edema] = groups == groups[0]  # the first patient's studies only: no p-value
    mask[:, edema] = 1
    ids = np.array([f"s{i:04d}" for i in range(len(groups))])
    results = [
        _analysed("v", ["vision"], Predictions(probs_a, targets, mask, ids, groups), n_boot=0),
        _analysed("a", ["vision", "text"], Predictions(probs_b, targets, mask, ids, groups), n_boot=0),
    ]
    (comparison,), _ = compare_to_vision(results, 0, 4)
    assert np.isnan(comparison.per_label["Edema"].p_value) and comparison.per_label_holm["Edema"] is None
    never_annotated = CHEXPERT_LABELS[1]  # _patient_split masks out column 1
    assert comparison.per_label[never_annotated] is None and comparison.per_label_holm[never_annotated] is None
    family = [n for n, t in comparison.per_label.items() if t is not None and not np.isnan(t.p_value)]
    assert len(family) == 12
    expected = holm([comparison.per_label[n].p_value for n in family])
    assert [comparison.per_label_holm[n] for n in family] == pytest.approx(expected, abs=1e-15)
