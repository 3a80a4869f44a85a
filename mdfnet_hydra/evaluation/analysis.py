"""Test-set metrics with uncertainty per run, paired comparisons against the vision-only baseline,
seed aggregation, and the spec's targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from mdfnet_hydra.evaluation.runs import Run, comparable
from mdfnet_hydra.evaluation.stats import (
    auroc_ci,
    bootstrap_mean_auroc,
    bootstrap_p_value,
    degrees_of_freedom,
    delong_test,
    holm,
    mean_auroc,
    percentile_ci,
    roc_points,
)
from mdfnet_hydra.labels import CHEXPERT_LABELS
from mdfnet_hydra.metrics import compute_metrics
from mdfnet_hydra.predictions import Predictions

# The spec's targets: the MDF-Net paper's numbers and the Enhanced goal.
TARGETS = {
    "vision": [("vision-only (MDF-Net paper)", 0.810)],
    "all": [("MDF-Net (paper)", 0.856), ("Enhanced MDF-Net goal", 0.860)],
}


def choose_thresholds(val: Predictions, rule: str, sensitivity: float) -> np.ndarray:
    """Per-label decision thresholds from validation: Youden's J, or the highest threshold that
    reaches the target sensitivity. 0.5 for labels without both classes on validation."""
    thresholds = np.full(val.probs.shape[1], 0.5)
    for j in range(val.probs.shape[1]):
        valid = val.mask[:, j] > 0
        y, p = val.targets[valid, j] > 0.5, val.probs[valid, j]
        if y.sum() == 0 or (~y).sum() == 0:
            continue
        candidates, fpr, tpr, _ = (a[::-1] for a in roc_points(y, p))  # ascending thresholds
        if rule == "youden":
            thresholds[j] = candidates[int(np.argmax(tpr - fpr))]  # the lowest threshold among ties
        elif rule == "sensitivity":
            reaching = candidates[tpr >= sensitivity]
            thresholds[j] = reaching.max() if len(reaching) else candidates.min()
        else:
            raise ValueError(f"evaluation.threshold_rule must be 'youden' or 'sensitivity', got {rule!r}")
    return thresholds


def _f1(tp: float, fp: float, fn: float) -> Optional[float]:
    return None if tp + fn == 0 else 2 * tp / max(2 * tp + fp + fn, 1e-12)


@dataclass
class RunResult:
    run: Run
    test: Predictions
    val: Optional[Predictions]
    thresholds: np.ndarray
    auroc: dict[str, Optional[tuple[float, float, float]]]  # label -> (auc, low, high) or None
    auprc: dict[str, Optional[float]]
    confusion: dict[str, Optional[tuple[int, int, int, int]]]  # label -> (tn, fp, fn, tp)
    mean_auroc: Optional[float]
    mean_ci: tuple[float, float] = (float("nan"), float("nan"))
    f1_macro: Optional[float] = None
    f1_micro: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)
    # the mean AUROC on each patient-level resample (n_bootstrap,) and the bootstrap's seed: the
    # paired comparisons reuse them
    mean_samples: Optional[np.ndarray] = None
    samples_seed: Optional[int] = None

    @property
    def mean_auprc(self) -> Optional[float]:
        values = [v for v in self.auprc.values() if v is not None]
        return float(np.mean(values)) if values else None

    @property
    def undefined(self) -> list[str]:
        return [name for name, v in self.auroc.items() if v is None]

    def targets(self) -> list[tuple[str, float, Optional[float]]]:
        """(target name, target value, this run's difference) for the seed's targets of its configuration."""
        return [
            (name, value, None if self.mean_auroc is None else self.mean_auroc - value)
            for name, value in TARGETS.get(self.run.modality, [])
        ]


def analyse(
    run: Run, test: Predictions, val: Optional[Predictions], rule: str, sensitivity: float, n_bootstrap: int, seed: int
) -> RunResult:
    thresholds = choose_thresholds(val, rule, sensitivity) if val is not None else np.full(test.probs.shape[1], 0.5)
    auprc = compute_metrics(test.probs, test.targets, test.mask)["auprc"]
    auroc, confusion = {}, {}
    f1s, totals = [], np.zeros(3)
    for j, name in enumerate(CHEXPERT_LABELS):
        valid = test.mask[:, j] > 0
        y, p = test.targets[valid, j] > 0.5, test.probs[valid, j]
        defined = 0 < y.sum() < len(y)
        auroc[name] = auroc_ci(y, p, test.group[valid]) if defined else None
        predicted = p >= thresholds[j]
        tp, fp = int((predicted & y).sum()), int((predicted & ~y).sum())
        fn, tn = int((~predicted & y).sum()), int((~predicted & ~y).sum())
        confusion[name] = (tn, fp, fn, tp) if valid.any() else None
        if (f1 := _f1(tp, fp, fn)) is not None:
            f1s.append(f1)
        totals += (tp, fp, fn)
    result = RunResult(
        run,
        test,
        val,
        thresholds,
        auroc,
        auprc,
        confusion,
        mean_auroc(test.probs, test.targets, test.mask),
        f1_macro=float(np.mean(f1s)) if f1s else None,
        f1_micro=_f1(*totals),
    )
    if n_bootstrap > 0 and result.mean_auroc is not None:
        samples = bootstrap_mean_auroc([test.probs], test.targets, test.mask, test.group, n_bootstrap, seed)[:, 0]
        result.mean_ci, result.mean_samples, result.samples_seed = percentile_ci(samples), samples, seed
    return result


# Below this many patients holding a label's positives (or its negatives), its per-label test rests on
# Student's t with under 9 degrees of freedom: it keeps its level (stats' module doc) but has little power.
FEW_PATIENTS = 10


@dataclass
class Comparison:
    run: str
    baseline: str
    per_label: dict[str, Optional[Any]]  # label -> PairedTest or None (undefined)
    per_label_holm: dict[str, Optional[float]]  # label -> Holm-adjusted p over the comparison's tested labels
    mean_difference: Optional[float]
    mean_ci: tuple[float, float]
    mean_p: Optional[float]


def compare_to_vision(results: list[RunResult], n_bootstrap: int, seed: int) -> tuple[list[Comparison], list[str]]:
    """Each multimodal run against a vision-only run on the same test set, scored against the same
    targets and masks (same stage and seed preferred): DeLong per label (clustered by patient),
    patient-level paired bootstrap for the mean AUROC. A baseline passed over for other labels on
    the same cases is named in the notes."""
    baselines = [r for r in results if r.run.modalities == ["vision"]]
    comparisons, notes = [], []
    for result in results:
        if len(result.run.modalities) < 2:
            continue
        pair, passed_over = _baseline_for(result, baselines)
        why = f"; not comparable: {'; '.join(passed_over)}" if passed_over else ""
        if pair is None:
            notes.append(f"{result.run.name}: no vision-only run on the same test set to compare with{why}")
            continue
        baseline, mine, theirs = pair
        if passed_over:
            notes.append(f"{result.run.name}: compared with {baseline.run.name}{why}")
        per_label, few = {}, []
        for j, name in enumerate(CHEXPERT_LABELS):
            valid = mine.mask[:, j] > 0
            y = mine.targets[valid, j] > 0.5
            per_label[name] = (
                delong_test(y, mine.probs[valid, j], theirs.probs[valid, j], mine.group[valid])
                if 0 < y.sum() < len(y)
                else None
            )
            if per_label[name] is not None and degrees_of_freedom(y, mine.group[valid]) + 1 < FEW_PATIENTS:
                few.append(name)  # a test only: an undefined label is reported as undefined already
        mean_diff, ci, p = None, (float("nan"), float("nan")), None
        if result.mean_auroc is not None and baseline.mean_auroc is not None:
            mean_diff = result.mean_auroc - baseline.mean_auroc
            if n_bootstrap > 0:
                differences = paired_differences(result, baseline, mine, theirs, n_bootstrap, seed)
                ci, p = percentile_ci(differences), bootstrap_p_value(differences)
        tested = [name for name, test in per_label.items() if test is not None]
        adjusted = dict(zip(tested, holm([per_label[name].p_value for name in tested])))  # NaN p: not counted
        holm_p = {name: None for name in per_label} | {name: p for name, p in adjusted.items() if p == p}
        comparisons.append(Comparison(result.run.name, baseline.run.name, per_label, holm_p, mean_diff, ci, p))
        if few:
            notes.append(
                f"{result.run.name}: the per-label tests of {', '.join(few)} rest on fewer than {FEW_PATIENTS} "
                "patients with a positive (or with a negative): wide intervals, little power (docs/outputs.md, "
                "statistical choices)"
            )
    return comparisons, notes


def _baseline_for(
    result: RunResult, baselines: list[RunResult]
) -> tuple[Optional[tuple[RunResult, Predictions, Predictions]], list[str]]:
    """The first comparable baseline (same stage, then same seed, preferred) with both runs'
    aligned predictions, and the baselines ranked before it that hold the same cases with other
    labels ("<run>: why"). Baselines of other test cases are passed over silently: another split."""
    ranked = sorted(baselines, key=lambda b: (b.run.stage != result.run.stage, b.run.seed != result.run.seed))
    passed_over = []
    for baseline in ranked:
        pair, why = comparable(result.test, baseline.test)
        if pair is not None:
            return (baseline, *pair), passed_over
        if why != "other test cases":
            passed_over.append(f"{baseline.run.name}: {why}")
    return None, passed_over


def paired_differences(
    result: RunResult, baseline: RunResult, mine: Predictions, theirs: Predictions, n_bootstrap: int, seed: int
) -> np.ndarray:
    """The mean-AUROC differences of two runs on the same patient-level resamples. A resample
    weighs each case by its patient's draw count, which depends only on the split's patients and the
    seed, not on the run or the order of its cases: where both runs hold the same cases with the same
    patients, labels and masks, each run's own bootstrap (`analyse`, the same seed) is already paired
    and is reused; otherwise (patients numbered otherwise, another resample count or seed) both are
    resampled together. The labels are the same: `comparable` pairs no runs with other labels."""
    reusable = (
        result.mean_samples is not None
        and baseline.mean_samples is not None
        and len(result.mean_samples) == len(baseline.mean_samples) == n_bootstrap
        and result.samples_seed == baseline.samples_seed == seed
        and all(np.array_equal(getattr(mine, k), getattr(theirs, k)) for k in ("group", "targets", "mask"))
    )
    if reusable:
        return result.mean_samples - baseline.mean_samples
    samples = bootstrap_mean_auroc([mine.probs, theirs.probs], mine.targets, mine.mask, mine.group, n_bootstrap, seed)
    return samples[:, 0] - samples[:, 1]


def aggregate_seeds(results: list[RunResult]) -> list[dict[str, Any]]:
    """Runs whose configurations differ in the seed alone (`Run.signature`): mean and standard
    deviation of the test mean AUROC. Groups that share a modality and stage are told apart by the
    config keys in which they differ. A copy of a run (the same checkpoint digest) is counted once;
    runs of the same seed trained again (another device count, a rerun: not a copy, but no other
    seed either) count as one seed, their mean; a group whose runs were scored on different test
    cases is marked. Each row's `notes` say so."""
    groups: dict[str, list[RunResult]] = {}
    for result in results:
        groups.setdefault(result.run.signature(), []).append(result)
    labels = _group_labels([members[0].run for members in groups.values()])
    rows = []
    for label, members in zip(labels, groups.values()):
        members, notes = _without_copies(members)
        by_seed: dict[int, list[RunResult]] = {}
        for member in members:
            by_seed.setdefault(member.run.seed, []).append(member)
        for seed, repeats in by_seed.items():
            if len(repeats) > 1:
                notes.append(
                    f"{', '.join(m.run.name for m in repeats)} share seed {seed} (trained again, e.g. on another "
                    "number of devices): one seed in the spread, their mean AUROC"
                )
        per_seed = [[m.mean_auroc for m in repeats if m.mean_auroc is not None] for repeats in by_seed.values()]
        values = [float(np.mean(v)) for v in per_seed if v]
        case_sets = {frozenset(m.test.sample_id.tolist()) for m in members}
        if len(case_sets) > 1:
            notes.append(
                f"{label}: its {len(members)} runs were scored on {len(case_sets)} different sets of test cases "
                "(data.small_sample draws each seed's subset): the spread mixes seeds and test cases"
            )
        rows.append(
            {
                "configuration": label,
                "runs": ", ".join(m.run.name for m in members),
                "seeds": ", ".join(str(seed) for seed in by_seed),
                "n": len(values),
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "test_cases": "same" if len(case_sets) == 1 else f"differ ({len(case_sets)} sets)",
                "notes": notes,
            }
        )
    return rows


def _without_copies(members: list[RunResult]) -> tuple[list[RunResult], list[str]]:
    """The group's runs with each checkpoint counted once (a run directory copied under another name
    is not another seed), and a note naming each copy and the run it duplicates."""
    kept: dict[str, RunResult] = {}
    unique, notes = [], []
    for member in members:
        digest = member.test.checkpoint_sha256
        original = kept.get(digest) if digest else None
        if original is not None:
            notes.append(
                f"{member.run.name} is a copy of {original.run.name} (the same checkpoint, SHA-256 {digest[:12]}...): "
                "counted once in its seed group"
            )
            continue
        if digest:
            kept[digest] = member
        unique.append(member)
    return unique, notes


def _group_labels(runs: list[Run], shown: int = 3) -> list[str]:
    """`modality/stage`, with the differing config keys where several groups share it."""
    base = [f"{run.modality}/{run.stage}" for run in runs]
    identities = [run.identity() for run in runs]
    labels = []
    for i, label in enumerate(base):
        others = [identities[j] for j, other in enumerate(base) if other == label and j != i]
        if not others:
            labels.append(label)
            continue
        mine = identities[i]
        keys = sorted({k for o in others for k in set(o) | set(mine) if o.get(k, _MISSING) != mine.get(k, _MISSING)})
        parts = [f"{k}={mine.get(k)}" for k in keys[:shown]] + (["..."] if len(keys) > shown else [])
        labels.append(f"{label} ({', '.join(parts)})")
    return labels


_MISSING = object()
