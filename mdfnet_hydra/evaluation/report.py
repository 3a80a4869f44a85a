"""One evaluation: every finished run under a directory -> tables and figures in an output directory.

A run whose files cannot be used is left out with a warning naming the file and the reason, and
listed in results.md and results_summary.csv; the others are evaluated. If every run found had to be
left out, `NoRunEvaluatedError` lists them in one line; a missing `experiments_dir`, one without
finished runs, or an `output_dir` that is or holds it raise `EvaluationInputError` before anything
is written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from mdfnet_hydra.evaluation import figures as fig
from mdfnet_hydra.evaluation.analysis import RunResult, aggregate_seeds, analyse, compare_to_vision
from mdfnet_hydra.evaluation.inputs import EvaluationInputError, input_problem, nothing_to_evaluate
from mdfnet_hydra.evaluation.runs import (
    LeftOut,
    LeftOutError,
    NoRunEvaluatedError,
    discover,
    leave_out,
    load_run_model,
    resolve_device,
    run_predictions,
)
from mdfnet_hydra.evaluation.tables import (
    COMPARISON_COLUMNS,
    comparison_rows,
    left_out_rows,
    markdown,
    summary_rows,
    write_csv,
)
from mdfnet_hydra.files import write_text

log = logging.getLogger(__name__)


def evaluate(
    experiments_dir: str | Path, output_dir: str | Path, options, data_root: Optional[str] = None
) -> dict[str, Any]:
    problem = input_problem(experiments_dir, output_dir)
    if problem:
        raise EvaluationInputError(problem)
    experiments_dir = Path(experiments_dir).expanduser().resolve()
    out = Path(output_dir).expanduser().resolve()
    checkpoint = getattr(options.checkpoint, "value", options.checkpoint)
    rule = getattr(options.threshold_rule, "value", options.threshold_rule)
    results: list[RunResult] = []
    left_out: list[LeftOut] = []
    for run in discover(experiments_dir, exclude=out, left_out=left_out):
        try:
            test = run_predictions(run, "test", checkpoint, data_root, options)
            val = run_predictions(run, "val", checkpoint, data_root, options)
        except LeftOutError as err:
            leave_out(left_out, run.name, err, experiments_dir)
            continue
        results.append(analyse(run, test, val, rule, options.target_sensitivity, options.n_bootstrap, options.seed))
        log.info(
            "evaluated %s (%s checkpoint, %s predictions): test mean AUROC %s",
            run.name,
            checkpoint,
            run.source.get("test"),
            "n/a" if results[-1].mean_auroc is None else f"{results[-1].mean_auroc:.4f}",
        )
    if not results and left_out:
        raise NoRunEvaluatedError(
            f"none of the {len(left_out)} run(s) under {experiments_dir} could be evaluated: "
            + "; ".join(item.describe(experiments_dir) for item in left_out)
        )
    if not results:
        raise EvaluationInputError(nothing_to_evaluate(experiments_dir))  # e.g. stages that never finished an epoch
    out.mkdir(parents=True, exist_ok=True)
    comparisons, notes = compare_to_vision(results, options.n_bootstrap, options.seed)
    seeds = aggregate_seeds(results)
    figures: list[Path] = []
    labels: dict[str, str] = {}
    if options.figures:
        shown = _shown(results, int(options.max_curves))
        labels = fig.short_labels([r.run for r in shown])  # legend label -> run: listed in results.md
        figures += fig.curves(shown, out, labels)
        figures.append(fig.auroc_bars(shown, out, labels))
        figures.append(fig.calibration(shown, out, labels=labels))
        names = fig.file_names([r.run.name for r in results])
        figures += [fig.confusion_matrices(r, rule, out, names[r.run.name]) for r in results]
        figures += _saliency(results, out, options, data_root, checkpoint)
    summary = summary_rows(results, rule)  # after the figures: saliency adds notes to runs
    written = [
        write_csv(out / "results_summary.csv", summary + left_out_rows(left_out, summary[0], experiments_dir)),
        write_csv(out / "comparisons.csv", comparison_rows(comparisons), COMPARISON_COLUMNS),
    ]
    written.append(
        write_text(
            out / "results.md",
            markdown(results, comparisons, notes, seeds, figures, out, rule, left_out, experiments_dir, labels),
        )
    )
    log.info(
        "evaluation of %d runs written to %s (results.md, results_summary.csv, comparisons.csv, %d figures)%s",
        len(results),
        out,
        len(figures),
        f"; {len(left_out)} run(s) left out, listed there" if left_out else "",
    )
    return {
        "runs": len(results),
        "output_dir": str(out),
        "files": [str(p) for p in written],
        "figures": [str(p) for p in figures],
        "left_out": [{"run": x.run, "file": str(x.file), "reason": x.reason} for x in left_out],
    }


def _shown(results: list[RunResult], limit: int) -> list[RunResult]:
    """The best runs by mean AUROC for the shared figures, always with a vision-only baseline."""
    ranked = sorted(results, key=lambda r: -(r.mean_auroc or 0))
    shown = ranked[:limit]
    baseline = next((r for r in ranked if r.run.modalities == ["vision"]), None)
    if baseline is not None and baseline not in shown:
        shown = shown[: limit - 1] + [baseline]
    return shown


def _saliency(results: list[RunResult], out: Path, options, data_root: Optional[str], checkpoint: str) -> list[Path]:
    from mdfnet_hydra.evaluation.saliency import saliency_maps

    written: list[Path] = []
    if options.saliency_per_label <= 0:
        return written
    names = fig.file_names([r.run.name for r in results])
    for result in results:
        run = result.run
        if "vision" not in run.modalities:
            continue
        if (run.config.get("data") or {}).get("name") != "synthetic" and not options.saliency_real_data:
            log.info("%s: no saliency figures for real data unless evaluation.saliency_real_data=true", run.name)
            continue
        try:
            model, datasets, prep = load_run_model(
                run.directory / "checkpoints" / f"{checkpoint}.pth", data_root, options.device, splits=("test",)
            )
        except LeftOutError as err:
            log.warning("%s: no saliency maps: %s", run.name, err)
            run.notes.append(f"no saliency maps: {err.reason}")
            continue
        written += saliency_maps(
            model,
            datasets["test"],
            prep.pad_id,
            result.test.probs,
            int(options.saliency_per_label),
            out / "saliency" / names[run.name],
            resolve_device(options.device),
        )
    return written
