"""results_summary.csv, comparisons.csv and results.md of an evaluation (each written whole or not at
all). Runs left out (damaged files) are listed in both results_summary.csv (a row with the
`left_out` column set and no metrics) and results.md ("Left out")."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Sequence

from mdfnet_hydra.evaluation.analysis import Comparison, RunResult
from mdfnet_hydra.evaluation.runs import LeftOut, shown_path
from mdfnet_hydra.files import atomic_target
from mdfnet_hydra.labels import CHEXPERT_LABELS


def _f(value: Optional[float], digits: int = 3) -> str:
    return "" if value is None or value != value else f"{value:.{digits}f}"


def _p(value: Optional[float]) -> str:
    if value is None or value != value:  # NaN: undefined (a label held by one patient)
        return ""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def summary_rows(results: Sequence[RunResult], rule: str) -> list[dict[str, Any]]:
    rows = []
    for r in sorted(results, key=lambda r: -(r.mean_auroc or 0)):
        targets = r.targets()
        row: dict[str, Any] = {
            "run": r.run.name,
            "modality": r.run.modality,
            "stage": r.run.stage,
            "seed": r.run.seed,
            **r.run.hyperparameters(),
            "test_auroc_mean": _f(r.mean_auroc, 4),
            "ci95_low": _f(r.mean_ci[0], 4),
            "ci95_high": _f(r.mean_ci[1], 4),
            "test_auprc_mean": _f(r.mean_auprc, 4),
            "f1_macro": _f(r.f1_macro, 4),
            "f1_micro": _f(r.f1_micro, 4),
            "threshold_rule": rule,
            "target": "; ".join(f"{name} {value:.3f}" for name, value, _ in targets),
            "difference_to_target": "; ".join(_f(diff, 4) for _, _, diff in targets),
            "undefined_labels": "; ".join(r.undefined),
            "predictions": r.run.source.get("test", ""),
            "notes": "; ".join(r.run.notes),
            "left_out": "",
        }
        for name in CHEXPERT_LABELS:
            auc = r.auroc[name]
            row[f"auroc/{name}"] = _f(auc[0] if auc else None, 4)
        rows.append(row)
    return rows


def left_out_rows(left_out: Sequence[LeftOut], template: dict[str, Any], root: Optional[Path]) -> list[dict[str, Any]]:
    """results_summary.csv rows of the runs left out: the run, "left out", and the file and why."""
    return [
        {
            **{key: "" for key in template},
            "run": item.run,
            "predictions": "left out",
            "left_out": f"{shown_path(item.file, root)}: {item.reason}",
        }
        for item in left_out
    ]


# p_holm: the per-label p-values Holm-adjusted over the comparison's tested labels (stats.holm)
COMPARISON_COLUMNS = ("run", "baseline", "label", "difference", "ci95_low", "ci95_high", "p_value", "p_holm")


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str] = ()) -> Path:
    """A table with its header; `columns` keeps the header when there are no rows (a CSV of zero
    bytes reads as a failed write)."""
    fields = list(rows[0]) if rows else list(columns)
    with atomic_target(path) as tmp, tmp.open("w", newline="") as handle:
        if fields:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return path


def _better_worse(c: Comparison, p_values: dict[str, Any]) -> str:
    """'better / worse': the labels whose difference is positive / negative at p < 0.05."""
    significant = [c.per_label[name].difference for name, p in p_values.items() if p is not None and p < 0.05]
    return f"{sum(d > 0 for d in significant)} / {sum(d < 0 for d in significant)}"


def comparison_rows(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    rows = []
    for c in comparisons:
        rows.append(
            {
                "run": c.run,
                "baseline": c.baseline,
                "label": "mean AUROC (patient bootstrap)",
                "difference": _f(c.mean_difference, 4),
                "ci95_low": _f(c.mean_ci[0], 4),
                "ci95_high": _f(c.mean_ci[1], 4),
                "p_value": _p(c.mean_p),
                "p_holm": "",
            }
        )
        for name, test in c.per_label.items():
            rows.append(
                {
                    "run": c.run,
                    "baseline": c.baseline,
                    "label": f"{name} (DeLong)",
                    "difference": _f(test.difference, 4) if test else "undefined",
                    "ci95_low": _f(test.ci_low, 4) if test else "",
                    "ci95_high": _f(test.ci_high, 4) if test else "",
                    "p_value": _p(test.p_value) if test else "",
                    "p_holm": _p(c.per_label_holm[name]) if test else "",
                }
            )
    return rows


def markdown(
    results: Sequence[RunResult],
    comparisons: Sequence[Comparison],
    notes: Sequence[str],
    seeds: Sequence[dict[str, Any]],
    figures: Sequence[Path],
    out: Path,
    rule: str,
    left_out: Sequence[LeftOut] = (),
    root: Optional[Path] = None,
    labels: Optional[dict[str, str]] = None,
) -> str:
    """results.md; `labels` (run name -> short label in the figures' legends) are listed under the figures."""
    lines = [
        "# Evaluation on the test split",
        "",
        f"Per-run test metrics of the selected checkpoint; mean AUROC with a patient-level bootstrap 95% CI; "
        f"F1 at per-label thresholds chosen on validation ({rule}). Labels without both classes are undefined "
        "and left out of the means.",
        "",
        "| run | modality | stage | seed | mean AUROC (95% CI) | target (difference) | mean AUPRC | macro F1 | micro F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: -(r.mean_auroc or 0)):
        targets = "; ".join(f"{name} {value:.3f} ({_f(diff)})" for name, value, diff in r.targets()) or "-"
        lines.append(
            f"| {r.run.name} | {r.run.modality} | {r.run.stage} | {r.run.seed} | {_f(r.mean_auroc)} "
            f"({_f(r.mean_ci[0])}-{_f(r.mean_ci[1])}) | {targets} | {_f(r.mean_auprc)} | {_f(r.f1_macro)} | {_f(r.f1_micro)} |"
        )
    lines += _damaged_section(results, left_out, root)
    lines += [
        "",
        "## Per-label test AUROC",
        "",
        "| label | " + " | ".join(r.run.name for r in results) + " |",
        "| --- |" + " --- |" * len(results),
    ]
    for name in CHEXPERT_LABELS:
        cells = []
        for r in results:
            auc = r.auroc[name]
            if auc is None:
                cells.append("undefined")
            else:  # no interval where one patient holds every positive or negative (NaN bounds)
                interval = f" ({auc[1]:.3f}-{auc[2]:.3f})" if auc[1] == auc[1] else " (no CI: one patient)"
                cells.append(f"{auc[0]:.3f}{interval}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Against the vision-only baseline (same test set)", ""]
    if comparisons:
        lines += [
            "| run | baseline | mean AUROC difference (95% CI) | p (patient bootstrap) "
            "| labels better / worse at p<0.05 (DeLong) | the same, Holm-adjusted over the tested labels |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for c in comparisons:
            raw = {name: t.p_value if t else None for name, t in c.per_label.items()}
            lines.append(
                f"| {c.run} | {c.baseline} | {_f(c.mean_difference)} ({_f(c.mean_ci[0])} to {_f(c.mean_ci[1])}) "
                f"| {_p(c.mean_p)} | {_better_worse(c, raw)} | {_better_worse(c, c.per_label_holm)} |"
            )
        lines += ["", "Per-label differences, CIs, DeLong p-values and Holm-adjusted ones: comparisons.csv."]
    else:
        lines.append("No multimodal run shares its test set with a vision-only run.")
    lines += [f"- {note}" for note in notes]
    lines += [
        "",
        "## Seeds",
        "",
        "Runs whose stored configurations differ in the seed alone (paths, logging, loader "
        "workers, time limit and evaluation settings aside; batch settings compared as the effective batch). "
        "A copy of a run (the same checkpoint) counts once, and runs of one seed trained again count as "
        "that seed once (their mean); `test cases` says whether the runs were scored on the same ones.",
        "",
        "| configuration | runs | seeds | n | mean AUROC mean | std | test cases |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in seeds:
        lines.append(
            f"| {_cell(row['configuration'])} | {row['runs']} | {row['seeds']} | {row['n']} | {_f(row['mean'])} "
            f"| {_f(row['std'])} | {row.get('test_cases', '')} |"
        )
    lines += [f"- {note}" for row in seeds for note in row.get("notes", [])]
    if figures:
        lines += ["", "## Figures", ""] + [
            f"- {p.relative_to(out)}" for p in figures if p.parent.parent.name != "saliency"
        ]
        maps: dict[Path, int] = {}
        for p in figures:
            if p.parent.parent.name == "saliency":
                maps[p.parent] = maps.get(p.parent, 0) + 1
        lines += [
            f"- {folder.relative_to(out)}/: Grad-CAM maps for {n} labels (<Label>.png)" for folder, n in maps.items()
        ]
    if figures and labels:
        lines += [
            "",
            "### Run labels in the figures",
            "",
            "The ROC, precision-recall, per-label AUROC and calibration figures name runs by these labels "
            "(`<modality> <stage> s<seed>`, with the end of the run's path where runs share those):",
            "",
            "| label | run |",
            "| --- | --- |",
        ]
        lines += [f"| {_cell(label)} | {_cell(name)} |" for name, label in labels.items()]
    return "\n".join(lines) + "\n"


def _damaged_section(results: Sequence[RunResult], left_out: Sequence[LeftOut], root: Optional[Path]) -> list[str]:
    worked_around = [(r.run.name, note) for r in results for note in r.run.notes]
    if not left_out and not worked_around:
        return []
    lines = ["", "## Left out", ""]
    if left_out:
        lines += [
            f"{len(left_out)} run(s) could not be evaluated and are not in the tables above:",
            "",
            "| run | file | reason |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {item.run} | {shown_path(item.file, root)} | {_cell(item.reason)} |" for item in left_out]
    else:
        lines.append("No run was left out.")
    if worked_around:
        lines += ["", "Evaluated despite a damaged file:", ""] + [f"- {name}: {note}" for name, note in worked_around]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
