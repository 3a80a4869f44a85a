"""What the evaluation's statistics cost at a real test split's size, without a model or figures.

    python -m mdfnet_hydra.benchmarks.evaluation_cost [--cases 10000] [--patients 5000] [--runs 2]
        [--n-bootstrap 1000] [--reference-resamples 10] [--seed 0]

Generates saved-prediction-like arrays (14 labels, 80% annotated, prevalences 1-40%, 1-3 studies
per patient) and times what `python -m mdfnet_hydra.evaluate` computes for each run
(`analysis.analyse`: DeLong CIs per label, thresholds, F1, the patient-level bootstrap of the mean
AUROC) and for each multimodal run against a vision-only one (`analysis.compare_to_vision`: DeLong per
label, the paired bootstrap). The bootstrap's reference is the rank AUROC (`stats.mean_auroc`) on the
explicitly resampled rows of `--reference-resamples` of the same resamples: its seconds scaled to
`--n-bootstrap`, the ratio, and the largest difference between the two. Printed: seconds per run,
per comparison and for an evaluation of `--runs` runs (half of them vision-only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mdfnet_hydra.evaluation.analysis import analyse, compare_to_vision
from mdfnet_hydra.evaluation.runs import Run
from mdfnet_hydra.evaluation.stats import bootstrap_mean_auroc, mean_auroc, patient_resample_weights
from mdfnet_hydra.labels import CHEXPERT_LABELS
from mdfnet_hydra.predictions import Predictions


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000, help="test studies")
    parser.add_argument("--patients", type=int, default=5_000, help="patients they belong to")
    parser.add_argument("--runs", type=int, default=2, help="runs in the evaluation (half vision-only)")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="as evaluation.n_bootstrap")
    parser.add_argument("--reference-resamples", type=int, default=10, help="resamples the reference computes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.patients <= args.cases or args.runs < 2 or args.n_bootstrap < 1 or args.reference_resamples < 1:
        parser.error("need 0 < patients <= cases, runs >= 2, n-bootstrap >= 1, reference-resamples >= 1")
    return args


def split_arrays(cases: int, patients: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets, mask, group): every patient holds at least one study."""
    group = np.concatenate([np.arange(patients), rng.integers(0, patients, cases - patients)])
    rng.shuffle(group)
    targets = (rng.random((cases, len(CHEXPERT_LABELS))) < np.linspace(0.01, 0.4, len(CHEXPERT_LABELS))).astype(
        np.float32
    )
    mask = (rng.random(targets.shape) < 0.8).astype(np.float32)
    return targets, mask, group


def predictions(targets, mask, group, strength: float, rng: np.random.Generator) -> Predictions:
    probs = np.clip(targets * strength + rng.random(targets.shape) * (1 - strength), 0, 1).astype(np.float32)
    ids = np.array([f"s{i}" for i in range(len(group))])
    return Predictions(probs, targets, mask, ids, group)


def fake_run(i: int, modalities: list[str]) -> Run:
    return Run(f"run{i}/stage2", Path(f"run{i}"), "stage2", modalities, {}, seed=i)


def reference_seconds(preds: Predictions, n_boot: int, resamples: int, seed: int) -> tuple[float, float]:
    """Seconds of the rank AUROC on explicitly resampled rows, scaled to `n_boot`, and the largest
    difference from the bootstrap over the same resamples."""
    weights = np.concatenate(list(patient_resample_weights(preds.group, resamples, seed)))
    fast = bootstrap_mean_auroc([preds.probs], preds.targets, preds.mask, preds.group, resamples, seed)[:, 0]
    start, worst = time.perf_counter(), 0.0
    for b, row in enumerate(weights):
        rows = np.repeat(np.arange(len(row)), row.astype(int))
        value = mean_auroc(preds.probs[rows], preds.targets[rows], preds.mask[rows])
        if (value is None) != np.isnan(fast[b]):
            worst = float("inf")  # defined in one and not the other
        elif value is not None:
            worst = max(worst, abs(value - fast[b]))
    return (time.perf_counter() - start) * n_boot / resamples, worst


def bootstrap_seconds(preds: Predictions, n_boot: int) -> float:
    start = time.perf_counter()
    bootstrap_mean_auroc([preds.probs], preds.targets, preds.mask, preds.group, n_boot, 0)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    rng = np.random.default_rng(args.seed)
    targets, mask, group = split_arrays(args.cases, args.patients, rng)
    runs = [
        (fake_run(i, ["vision"] if i % 2 == 0 else ["vision", "text", "clinical"]), i % 2 * 0.1 + 0.3)
        for i in range(args.runs)
    ]
    preds = [predictions(targets, mask, group, strength, rng) for _, strength in runs]
    start = time.perf_counter()
    results = [analyse(run, p, p, "youden", 0.9, args.n_bootstrap, 0) for (run, _), p in zip(runs, preds)]
    analysed = time.perf_counter() - start
    start = time.perf_counter()
    comparisons, _ = compare_to_vision(results, args.n_bootstrap, 0)
    compared = time.perf_counter() - start
    reference, worst = reference_seconds(preds[0], args.n_bootstrap, args.reference_resamples, 0)
    per_run = analysed / len(results)
    bootstrap = bootstrap_seconds(preds[0], args.n_bootstrap)
    print(
        f"test split: {args.cases} studies of {args.patients} patients, {len(CHEXPERT_LABELS)} labels; "
        f"{args.n_bootstrap} patient-level resamples"
    )
    print(f"per run (analyse):                   {per_run:8.2f} s  (its bootstrap alone {bootstrap:.2f} s)")
    print(f"per comparison (compare_to_vision):  {compared / max(len(comparisons), 1):8.2f} s")
    print(f"evaluation of {len(results)} runs, {len(comparisons)} comparisons: {analysed + compared:8.2f} s")
    print(
        f"reference bootstrap (rank AUROC on resampled rows, {args.reference_resamples} resamples scaled): "
        f"{reference:.2f} s; {reference / bootstrap:.1f}x the bootstrap; largest difference {worst:.1e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
