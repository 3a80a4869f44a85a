"""Uncertainty for AUROC: DeLong's variance and paired test, and a patient-level bootstrap.

DeLong et al. (1988), computed with Sun & Xu's (2014) midrank algorithm: for scores of k models on
the same cases, the AUROCs and their covariance matrix. Cases of one patient are not independent
(several studies per patient), so given each case's patient the covariance is Obuchowski's (1997)
clustered one (DeLong's per-case components summed per patient), and the mean AUROC over labels gets
a patient-level bootstrap: patients are resampled with replacement, each with all of their cases.

Intervals and p-values from that variance use Student's t with one degree of freedom fewer than the
patients holding a positive or a negative, whichever are fewer: a rare label's variance rests on
its few positive patients, and the normal reference made its test liberal (simulated: 32% false
positives at p < 0.05 with positives from 2 patients, 14% from 5; with t 0.7% and 5.3%).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    bounds = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1], True])
    starts, ends = bounds[:-1], bounds[1:]  # each tie group is sorted_x[start:end]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(0.5 * (starts + ends - 1) + 1.0, ends - starts)
    return ranks


def delong(y: np.ndarray, scores: np.ndarray, groups: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (k,) and their DeLong covariance (k, k) for scores (k, n) of k models on n cases;
    with `groups` (n,), each case's patient, the covariance is clustered by patient (Obuchowski)."""
    y = np.asarray(y).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("AUROC needs at least one positive and one negative case")
    k = scores.shape[0]
    tx = np.stack([_midranks(pos[r]) for r in range(k)])
    ty = np.stack([_midranks(neg[r]) for r in range(k)])
    tz = np.stack([_midranks(np.concatenate([pos[r], neg[r]])) for r in range(k)])
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n  # per positive: fraction of negatives it outranks
    v10 = 1.0 - (tz[:, m:] - ty) / m  # per negative: fraction of positives that outrank it
    if groups is not None:
        return aucs, _clustered_covariance(aucs, v01, v10, np.asarray(groups)[y], np.asarray(groups)[~y])
    sx = np.atleast_2d(np.cov(v01)) if m > 1 else np.zeros((k, k))
    sy = np.atleast_2d(np.cov(v10)) if n > 1 else np.zeros((k, k))
    return aucs, sx / m + sy / n


def _clustered_covariance(
    aucs: np.ndarray, v01: np.ndarray, v10: np.ndarray, pos_groups: np.ndarray, neg_groups: np.ndarray
) -> np.ndarray:
    """Obuchowski's (1997) covariance of the AUROCs. Each patient's components are summed and
    centred on its count of positives / negatives times the AUROC (`v01` here, one per positive, is
    her V10; `v10`, one per negative, her V01). The positives' products are averaged with the
    I10 / (I10 - 1) correction over the I10 patients holding a positive, the negatives' with
    I01 / (I01 - 1), the cross products with I / (I - 1): with one study per patient this is DeLong's
    covariance exactly. NaN (undefined) where fewer than two patients hold a positive or a negative:
    one patient's summed components are centred to zero, which would drop that side's variance."""
    k = len(aucs)
    _, patient = np.unique(np.concatenate([pos_groups, neg_groups]), return_inverse=True)
    n_patients = int(patient.max()) + 1
    m, n = v01.shape[1], v10.shape[1]
    pos_of, neg_of = patient[:m], patient[m:]
    pos_count = np.bincount(pos_of, minlength=n_patients)
    neg_count = np.bincount(neg_of, minlength=n_patients)
    with_pos, with_neg = int((pos_count > 0).sum()), int((neg_count > 0).sum())
    if min(with_pos, with_neg) < 2:
        return np.full((k, k), np.nan)
    dx = np.stack([np.bincount(pos_of, v01[r], n_patients) for r in range(k)]) - pos_count * aucs[:, None]
    dy = np.stack([np.bincount(neg_of, v10[r], n_patients) for r in range(k)]) - neg_count * aucs[:, None]
    s10 = with_pos / (with_pos - 1) * (dx @ dx.T) / m
    s01 = with_neg / (with_neg - 1) * (dy @ dy.T) / n
    s11 = n_patients / (n_patients - 1) * (dx @ dy.T)
    return s10 / m + s01 / n + (s11 + s11.T) / (m * n)


def _incomplete_beta(a: float, b: float, x: float, x_complement: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (`x_complement` = 1 - x, given exactly),
    by its continued fraction on the side where it converges fast (the side is decided here once:
    x and its complement need not sum to exactly 1, so deciding again could swap back and forth)."""
    if x <= 0.0 or x_complement <= 0.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _beta_continued_fraction(b, a, x_complement, x)
    return _beta_continued_fraction(a, b, x, x_complement)


def _beta_continued_fraction(a: float, b: float, x: float, x_complement: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), for x below (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(x_complement)
    )
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction / a


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom (no scipy at run time)."""
    if math.isnan(t) or not df > 0:
        return float("nan")
    if math.isinf(t):
        return 0.0
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))


@functools.lru_cache(maxsize=4096)
def t_quantile(df: float, level: float = 0.95) -> float:
    """The two-sided `level` quantile of Student's t (12.71 at df 1, 1.96 as df grows), by bisection."""
    if not df > 0:
        return float("nan")
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > 1.0 - level:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        low, high = (middle, high) if t_two_sided_p(middle, df) > 1.0 - level else (low, middle)
    return high


def degrees_of_freedom(y: np.ndarray, groups: Optional[np.ndarray] = None) -> int:
    """One fewer than the units holding a positive or a negative, whichever are fewer: patients
    with `groups`, cases without (below 1: no interval and no test)."""
    y = np.asarray(y).astype(bool)
    if groups is None:
        return int(min(y.sum(), (~y).sum())) - 1
    groups = np.asarray(groups)
    return min(len(np.unique(groups[y])), len(np.unique(groups[~y]))) - 1


@dataclass
class PairedTest:
    auc_a: float
    auc_b: float
    difference: float  # a - b
    ci_low: float
    ci_high: float
    p_value: float


def delong_test(
    y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, groups: Optional[np.ndarray] = None
) -> PairedTest:
    """DeLong's test of AUROC(a) = AUROC(b) on the same cases, with a 95% CI of the difference
    (clipped to [-1, 1]); `groups`: each case's patient (the clustered covariance). Student's t
    reference (module doc)."""
    aucs, cov = delong(y, np.vstack([scores_a, scores_b]), groups)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    df = degrees_of_freedom(y, groups)
    if df < 1 or math.isnan(var):
        return PairedTest(float(aucs[0]), float(aucs[1]), diff, float("nan"), float("nan"), float("nan"))
    if var <= 0:
        p = 1.0 if diff == 0 else 0.0
        se = 0.0
    else:
        se = var**0.5
        p = t_two_sided_p(diff / se, df)
    q = t_quantile(df)
    return PairedTest(float(aucs[0]), float(aucs[1]), diff, max(-1.0, diff - q * se), min(1.0, diff + q * se), p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN ones, untested, stay NaN and are not
    counted): the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j)). Calling
    labels different at adjusted p < 0.05 then makes any false call with a chance of at most 5% (given
    valid p-values), where 14 unadjusted tests at 0.05 make one in 51% of null families (independent)."""
    values = np.asarray(p_values, dtype=np.float64)
    tested = np.flatnonzero(~np.isnan(values))
    order = tested[np.argsort(values[tested], kind="stable")]
    m = len(order)
    adjusted = np.full(len(values), np.nan)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * values[order]))
    return adjusted.tolist()


def auroc_ci(y: np.ndarray, scores: np.ndarray, groups: Optional[np.ndarray] = None) -> tuple[float, float, float]:
    """AUROC with DeLong's 95% confidence interval (clipped to [0, 1]); `groups`: each case's
    patient (the clustered covariance). Student's t reference (module doc)."""
    aucs, cov = delong(y, scores, groups)
    auc = float(aucs[0])
    df = degrees_of_freedom(y, groups)
    if df < 1 or np.isnan(cov[0, 0]):  # one patient (or case) holds every positive or negative: no interval
        return auc, float("nan"), float("nan")
    half = t_quantile(df) * float(np.sqrt(max(cov[0, 0], 0.0)))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, fpr, tpr, precision) for "positive if p >= threshold" at every distinct score,
    highest threshold first: one sort and cumulative counts instead of a pass per threshold."""
    order = np.argsort(-p, kind="mergesort")
    y, p = np.asarray(y)[order].astype(float), np.asarray(p)[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # last index of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    return p[last], fp / max(fp[-1], 1), tp / max(tp[-1], 1), tp / (tp + fp)


def fast_auroc(y: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Rank-based AUROC (ties counted half); None without both classes. A target above 0.5 is
    positive, as in the bootstrap and the per-label analysis."""
    y = np.asarray(y) > 0.5
    m = int(y.sum())
    n = len(y) - m
    if m == 0 or n == 0:
        return None
    ranks = _midranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - m * (m + 1) / 2) / (m * n))


def mean_auroc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> Optional[float]:
    """Macro mean over labels with both classes among their valid entries (the training metric)."""
    values = [fast_auroc(targets[mask[:, j] > 0, j], probs[mask[:, j] > 0, j]) for j in range(probs.shape[1])]
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


# cases x resamples the bootstrap weighs at once: 32 MB of float64 weights, and a few arrays of that
# size while a label is computed (about 200 MB at the peak for 50,000 cases)
BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


@dataclass
class _LabelOrder:
    """One label's valid cases in ascending score order, for AUROCs under case weights."""

    cases: np.ndarray  # indices of the valid cases, by ascending score
    positive: np.ndarray  # (len(cases),) bool
    starts: np.ndarray  # where each run of equal scores begins in `cases`


def _label_order(scores: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> _LabelOrder:
    valid = np.flatnonzero(mask > 0)
    order = valid[np.argsort(scores[valid], kind="mergesort")]
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]) if len(order) else order
    return _LabelOrder(order, targets[order] > 0.5, starts)


def _weighted_aurocs(weights: np.ndarray, label: _LabelOrder) -> np.ndarray:
    """(B,) AUROCs of one label under B rows of case weights (a case drawn twice counts twice, ties
    half), NaN where a row leaves no positive or no negative: the rank AUROC of each resampled set."""
    if len(label.cases) == 0:
        return np.full(len(weights), np.nan)
    w = weights[:, label.cases]
    pos = np.add.reduceat(np.where(label.positive, w, 0.0), label.starts, axis=1)  # per run of equal scores
    neg = np.add.reduceat(np.where(label.positive, 0.0, w), label.starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each run
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def patient_resample_weights(groups: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Each case's count in each patient-level resample, in chunks of rows (B, n cases): per
    resample, as many patients as the split has are drawn with replacement (`rng.integers` over the
    sorted patient ids, one call per resample) and each brings all of its cases."""
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(groups, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    chunk = max(1, BOOTSTRAP_CHUNK_ELEMENTS // max(len(inverse), n_groups, 1))
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        drawn = np.stack([rng.integers(0, n_groups, n_groups) for _ in range(rows)])
        drawn += n_groups * np.arange(rows)[:, None]  # row r's patients counted in bins [r G, (r + 1) G)
        counts = np.bincount(drawn.ravel(), minlength=rows * n_groups).reshape(rows, n_groups)
        yield counts[:, inverse].astype(np.float64)


def bootstrap_mean_auroc(
    probs: Sequence[np.ndarray],
    targets: np.ndarray,
    mask: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """(n_boot, len(probs)) mean AUROCs of each model on the same patient-level resamples (NaN where
    a resample leaves no label defined). A resample is a weighting of the cases (how often each was
    drawn), so each label's scores are sorted once, not once per resample: the same values as
    `mean_auroc` on the resampled rows, at a fraction of the cost (benchmarks/evaluation_cost.py)."""
    orders = [[_label_order(p[:, j], targets[:, j], mask[:, j]) for j in range(p.shape[1])] for p in probs]
    out = np.full((n_boot, len(probs)), np.nan)
    start = 0
    for weights in patient_resample_weights(groups, n_boot, seed):
        rows = slice(start, start + len(weights))
        for k, labels in enumerate(orders):
            aurocs = np.stack([_weighted_aurocs(weights, label) for label in labels], axis=1)
            defined = (~np.isnan(aurocs)).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[rows, k] = np.where(defined > 0, np.nansum(aurocs, axis=1) / defined, np.nan)
        start += len(weights)
    return out


def percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of the resamples where the value is defined (NaN, NaN if none is)."""
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return float("nan"), float("nan")
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def bootstrap_p_value(differences: np.ndarray) -> Optional[float]:
    """Two-sided p-value of 'no difference' from bootstrap differences (at least 1 / n); None
    where no resample defines the difference."""
    d = differences[~np.isnan(differences)]
    if len(d) == 0:
        return None
    tail = min((d <= 0).mean(), (d >= 0).mean())
    return float(min(1.0, max(2 * tail, 1.0 / len(d))))
