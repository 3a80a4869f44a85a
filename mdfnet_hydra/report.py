"""The compact end-of-job table: per-label and mean AUROC of the selected checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from mdfnet_hydra.labels import CHEXPERT_LABELS

# how a stage's summary line names what stopped it before its configured epochs
STOPPED_BY = {"pruned": "the sweep's pruner", "max_time": "trainer.max_time", "early_stopping": "early stopping"}


def _cell(value: Optional[float]) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def _cut(result: dict[str, Any]) -> str:
    """The epoch trainer.max_time cut short, whose steps were discarded, and how to continue."""
    if result.get("stopped_by") != "max_time":
        return ""
    cut = result.get("unfinished_epoch")
    part = f"; epoch {cut['epoch']}'s first {cut['steps_done']} of {cut['steps']} steps discarded" if cut else ""
    return f"{part}; a larger trainer.max_time continues it"


def _mean_label(val: dict[str, Any], test: Optional[dict[str, Any]]) -> str:
    """`mean (14 defined labels)`, with each split's count where the test split defines fewer or
    more labels than validation: each mean is over its own split's defined labels."""
    on_val = len(CHEXPERT_LABELS) - len(val["undefined_labels"])
    on_test = None if test is None else len(CHEXPERT_LABELS) - len(test["undefined_labels"])
    if on_test is None or on_test == on_val:
        return f"mean ({on_val} defined labels)"
    return f"mean ({on_val} val / {on_test} test defined labels)"


def format_summary(
    results: dict[str, dict[str, Any]], run_dir: Path, evaluation: Optional[Path] = None, warnings: Sequence[str] = ()
) -> str:
    """`warnings`: what the job warned about at its start, repeated first (the start scrolled away)."""
    head = [f"WARNING: {text}" for text in warnings]
    evaluated = [name for name, r in results.items() if r.get("val")]
    if not evaluated:
        return "\n".join(
            [
                *head,
                f"No epoch finished (trainer.max_time spent before the first one ended); nothing to report. A rerun "
                f"with a larger trainer.max_time (or trainer.max_time=null) trains it. Run: {run_dir}",
            ]
        )
    final_name = evaluated[-1]
    final = results[final_name]
    val, test = final["val"], final.get("test")
    mean_label = _mean_label(val, test)
    width = max(28, len(mean_label))
    lines = [
        *head,
        f"AUROC of {final_name}'s {final['selected_checkpoint']} checkpoint (epoch {final['best_epoch']}):",
        f"  {'label':<{width}} {'val':>6} {'test':>6}  val pos/neg",
    ]
    for name in CHEXPERT_LABELS:
        lines.append(
            f"  {name:<{width}} {_cell(val['auroc'][name]):>6} {_cell(test['auroc'][name] if test else None):>6}"
            f"  {val['positives'][name]}/{val['negatives'][name]}"
        )
    lines.append(
        f"  {mean_label:<{width}} {_cell(val['auroc_mean']):>6} {_cell(test['auroc_mean'] if test else None):>6}"
    )
    lines.append(
        f"  {'mean AUPRC':<{width}} {_cell(val['auprc_mean']):>6} {_cell(test['auprc_mean'] if test else None):>6}"
    )
    lines.append(
        f"  {'macro F1 @ ' + str(val['threshold']):<{width}} {_cell(val['f1_macro']):>6} "
        f"{_cell(test['f1_macro'] if test else None):>6}"
    )
    for split, result in (("val", val), ("test", test)):
        if result and result["undefined_labels"]:
            lines.append(
                f"  undefined on {split} (no positives or no negatives), left out of the {split} mean: "
                f"{', '.join(result['undefined_labels'])}"
            )
    for name, result in results.items():
        if not result.get("val"):
            continue
        mean = result["val"]["auroc_mean"]
        lines.append(
            f"  {name}: val mean AUROC {_cell(mean).strip()} at epoch {result['best_epoch']} of {result['epochs_run']}"
            f"{' (stopped by ' + STOPPED_BY.get(result['stopped_by'], result['stopped_by']) + _cut(result) + ')' if result.get('stopped_by') else ''}, {result['wall_time_s']:.0f}s"
        )
    lines.append("Wrote:")
    lines.append(f"  run        {run_dir}  (config: .hydra/, log: logs/train.log, summary: metrics.json)")
    for name in results:
        stage_dir = run_dir / name
        lines.append(
            f"  {name:<10} {stage_dir}  (config.yaml, logs/, tensorboard/, checkpoints/, metrics.json, predictions/)"
        )
    if evaluation is not None:
        lines.append(f"  evaluation {evaluation}  (results.md, results_summary.csv, comparisons.csv, figures)")
    lines.append(f"  TensorBoard: tensorboard --logdir {run_dir}")
    return "\n".join(lines)
