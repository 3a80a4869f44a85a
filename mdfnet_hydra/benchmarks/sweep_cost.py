"""What pruning saves: the same TPE search of the spec's space run twice, without and with a pruner,
same seed and trial count, and what each cost.

    python -m mdfnet_hydra.benchmarks.sweep_cost [--trials 24] [--pruner hyperband] [--seed 0] [--out DIR] [overrides ...]

Each search is one `--multirun hparams=bayesian` through the real entry point, on the synthetic
default data with short stages (SHORT_TRIAL below; any Hydra override given here replaces them), in
its own study. Printed: the best validation mean AUROC of each search, its training epochs (summed
over trials and stages), wall time, trials pruned, and the ratios. Target (issue): the pruned search
within 0.005 of the unpruned best while spending at most 50% of its epochs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# short two-stage trials of the full model: the spec's 15 + 30 epochs (3 learning-rate warm-up epochs
# each) at a third, 5 + 10 (1), of at most 16 batches, so 24 trials take minutes on 2 CPU cores with
# the spec's stage proportions. The pruners keep the presets' settings: the median pruner's 3 warm-up
# epochs are a fifth of such a trial, against a fifteenth of the spec's
SHORT_TRIAL = (
    "data.small_sample=512",
    "phases.stage1.epochs=5",
    "phases.stage1.warmup_epochs=1",
    "phases.stage2.epochs=10",
    "phases.stage2.warmup_epochs=1",
    "phases.stage2.early_stopping_patience=null",
    "trainer.limit_train_batches=16",
    "evaluation.on_finish=false",
)


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24, help="trials of each search")
    parser.add_argument(
        "--pruner", default="hyperband", choices=["median", "asha", "hyperband"], help="default: the presets' own"
    )
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed, the same for both searches")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/benchmarks/sweep_cost-<time>")
    return parser.parse_known_args(argv)


def search_command(args: argparse.Namespace, overrides: list[str], out: Path, pruner: str) -> list[str]:
    """One search: the same sampler, seed, space and trial count; only the pruner differs."""
    given = {o.split("=", 1)[0] for o in overrides}
    short = [o for o in SHORT_TRIAL if o.split("=", 1)[0] not in given]
    return [
        sys.executable, "-m", "mdfnet_hydra.train", "--multirun", "hparams=bayesian",
        f"hparams.n_trials={args.trials}", f"hparams.study_name=sweep_cost-{pruner}", f"hparams.pruner.name={pruner}",
        f"seed={args.seed}", f"paths.root={out}", f"hydra.sweep.dir={out / pruner}", *short, *overrides,
    ]  # fmt: skip


def search_cost(sweep_dir: Path) -> dict[str, Any]:
    """Best validation mean AUROC of the finished trials, epochs trained, trials pruned."""
    best, epochs, pruned, trials = None, 0, 0, 0
    for summary_file in sorted(sweep_dir.glob("*/metrics.json")):
        summary = json.loads(summary_file.read_text())
        trials += 1
        epochs += sum(int(stage.get("epochs_run") or 0) for stage in summary["stages"].values())
        if summary.get("pruned"):
            pruned += 1
            continue  # the study's best is a finished trial's
        if summary.get("objective") is not None and (best is None or summary["objective"] > best):
            best = summary["objective"]
    return {"best_val_auroc": best, "epochs": epochs, "pruned": pruned, "trials": trials}


def report(costs: dict[str, dict[str, Any]], pruner: str) -> str:
    base, cut = costs["none"], costs[pruner]
    lines = [f"{'search':<12} {'best val AUROC':>15} {'epochs':>7} {'wall s':>8} {'pruned':>7} {'trials':>7}"]
    for name, c in costs.items():
        best = "n/a" if c["best_val_auroc"] is None else f"{c['best_val_auroc']:.4f}"
        lines.append(f"{name:<12} {best:>15} {c['epochs']:>7} {c['wall_s']:>8.0f} {c['pruned']:>7} {c['trials']:>7}")
    if base["best_val_auroc"] is not None and cut["best_val_auroc"] is not None:
        gap = base["best_val_auroc"] - cut["best_val_auroc"]
        share = cut["epochs"] / max(base["epochs"], 1)
        lines.append(f"best AUROC given up by pruning: {gap:+.4f}; epochs spent: {share:.0%}; wall time: "
                     f"{cut['wall_s'] / max(base['wall_s'], 1e-9):.0%}")  # fmt: skip
        met = gap <= 0.005 and share <= 0.5
        lines.append(f"target (within 0.005 of the best, at most 50% of the epochs): {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_arguments(argv)
    out = (args.out or Path("outputs/benchmarks") / time.strftime("sweep_cost-%Y%m%d-%H%M%S")).resolve()
    costs: dict[str, dict[str, Any]] = {}
    for pruner in ("none", args.pruner):
        command = search_command(args, overrides, out, pruner)
        print("running:", " ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        costs[pruner] = {**search_cost(out / pruner), "wall_s": time.perf_counter() - started}
    text = report(costs, args.pruner)
    (out / "sweep_cost.json").write_text(json.dumps(costs, indent=2))
    print(f"\n{text}\nresults in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
