"""`results_summary.csv` for a sweep directory: one row per job.

Written at the end of every multirun by a Hydra callback (configured in conf/train.yaml), and
rebuilt for any sweep directory with

    python -m mdfnet_hydra.summary <sweep dir>
"""

from __future__ import annotations

import csv
import json
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from mdfnet_hydra.files import atomic_target
from mdfnet_hydra.labels import CHEXPERT_LABELS
from mdfnet_hydra.resolvers import OPTUNA_DB

SUMMARY_FILE = "results_summary.csv"
BASE_COLUMNS = [
    "job",
    "overrides",
    "modality",
    "stage",
    "status",
    "reason",
    "val_auroc_mean",
    "test_auroc_mean",
    "val_auroc_min",
    "test_auroc_min",
    "val_auprc_mean",
    "test_auprc_mean",
    "val_f1_macro",
    "val_f1_micro",
    "test_f1_macro",
    "test_f1_micro",
    "best_epoch",
    "epochs_run",
    "stopped_by",
    "pruned_at",
    "wall_time_s",
]
LABEL_COLUMNS = [f"val_auroc/{name}" for name in CHEXPERT_LABELS] + [f"test_auroc/{name}" for name in CHEXPERT_LABELS]


class DamagedJobFileError(ValueError):
    """A file of a job directory that cannot be read or does not hold what a job writes (a write
    cut short): that job's row says so and the other jobs are summarised as usual."""

    def __init__(self, file: str, reason: str) -> None:
        self.file, self.reason = file, " ".join(reason.split())[:300]
        super().__init__(f"{file}: {self.reason}")


def job_row(job_dir: Path) -> Optional[dict[str, Any]]:
    """One job directory as a row; None for directories that are not Hydra jobs. A damaged job
    file gives status `damaged` and a reason naming the file, never an error for the whole sweep."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return None
    row: dict[str, Any] = {"job": job_dir.name}
    try:
        _fill_row(row, job_dir)
    except DamagedJobFileError as err:
        kept = {k: row[k] for k in ("job", "overrides", "modality", "stage") if k in row}  # no metrics
        return {**kept, "status": "damaged", "reason": f"{err.file} is damaged: {err.reason}"}
    return row


def _fill_row(row: dict[str, Any], job_dir: Path) -> None:
    overrides = _read_yaml(job_dir, ".hydra/overrides.yaml")
    if not isinstance(overrides, ListConfig):
        raise DamagedJobFileError(".hydra/overrides.yaml", "not the list of overrides Hydra writes")
    row["overrides"] = " ".join(str(o) for o in overrides)
    config = _read_yaml(job_dir, ".hydra/config.yaml")
    try:
        row.update(modality=config.modality.name, stage=config.stage.name)
    except Exception as err:  # noqa: BLE001 - a config without modality.name / stage.name
        raise DamagedJobFileError(".hydra/config.yaml", f"no modality.name or stage.name ({err})") from err
    if (job_dir / "failure.json").is_file():
        failure = _read_json(job_dir, "failure.json")
        if not isinstance(failure, dict) or "reason" not in failure:
            raise DamagedJobFileError("failure.json", "no reason in it")
        row.update(status="failed", reason=failure["reason"])
    elif not (job_dir / "metrics.json").is_file():
        row.update(status="incomplete", reason="no metrics.json (running, killed or requeued)")
        return
    else:
        row["status"] = "completed"
    if (job_dir / "metrics.json").is_file():
        try:
            _add_metrics(row, _read_json(job_dir, "metrics.json"), str(config.stage.name))
        except (AttributeError, KeyError, TypeError) as err:
            raise DamagedJobFileError("metrics.json", f"not what a job writes ({type(err).__name__}: {err})") from err


def _add_metrics(row: dict[str, Any], summary: Any, stage: str) -> None:
    """The job's final-stage metrics from its metrics.json (AttributeError, KeyError or TypeError
    for one that does not have the shape a job writes)."""
    pruned = summary.get("pruned")
    if pruned and row["status"] == "completed":  # stopped by the sweep's pruner (pruning.py)
        row.update(status="pruned", pruned_at=f"{pruned['stage']} epoch {pruned['epoch']} (step {pruned['step']})")
    final = summary["stages"].get(summary.get("final_stage") or "", {})
    row["stage"] = f"{stage}:{summary.get('final_stage')}"
    for split in ("val", "test"):
        metrics = final.get(split) or {}
        for key in ("auroc_mean", "auroc_min", "auprc_mean", "f1_macro", "f1_micro"):
            row[f"{split}_{key}"] = metrics.get(key)
        for name in CHEXPERT_LABELS:
            row[f"{split}_auroc/{name}"] = (metrics.get("auroc") or {}).get(name)
    row["best_epoch"] = final.get("best_epoch")
    row["epochs_run"] = final.get("epochs_run")
    row["stopped_by"] = final.get("stopped_by")
    row["wall_time_s"] = round(sum(s.get("wall_time_s", 0.0) for s in summary["stages"].values()), 3)


def _read_yaml(job_dir: Path, name: str) -> Any:
    try:
        return OmegaConf.load(job_dir / name)
    except Exception as err:  # noqa: BLE001 - whatever a damaged YAML file makes the parser raise
        raise DamagedJobFileError(name, f"{type(err).__name__}: {err}") from err


def _read_json(job_dir: Path, name: str) -> Any:
    try:
        return json.loads((job_dir / name).read_text())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, or not (whole) JSON
        raise DamagedJobFileError(name, f"{type(err).__name__}: {err}") from err


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of the sweep, in job order."""
    rows = [row for d in sorted(p for p in sweep_dir.iterdir() if p.is_dir()) if (row := job_row(d)) is not None]
    return sorted(rows, key=lambda r: _job_order(r["job"]))


def write_summary(sweep_dir: str | Path, rows: Optional[list[dict[str, Any]]] = None) -> Path:
    sweep_dir = Path(sweep_dir)
    rows = job_rows(sweep_dir) if rows is None else rows
    out = sweep_dir / SUMMARY_FILE
    with atomic_target(out) as tmp, tmp.open("w", newline="") as handle:  # several sweep processes may write it
        writer = csv.DictWriter(handle, fieldnames=BASE_COLUMNS + LABEL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out


def damaged_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A warning per damaged job, so that its row in the table is not the only place it shows."""
    return [f"warning: job {r['job']}: {r['reason']}" for r in rows if r.get("status") == "damaged"]


def _job_order(name: str) -> tuple[int, str]:
    head = name.split("_", 1)[0]
    return (int(head), name) if head.isdigit() else (sys.maxsize, name)


class WriteSummary(Callback):
    """Hydra callback: results_summary.csv at the sweep root when a multirun ends, and the
    evaluation (tables, comparisons, figures) of its runs in <sweep>/evaluation."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir() or "bench" in config:  # a multirun of benchmarks trains no runs
            return
        rows = job_rows(sweep_dir)
        if not rows and not (sweep_dir / SUMMARY_FILE).exists():  # refused before any job: leave nothing
            with suppress(OSError):
                sweep_dir.rmdir()  # (only if empty)
            return
        out = write_summary(sweep_dir, rows)
        for line in damaged_lines(rows):
            print(f"[mdfnet-hydra] {line}", flush=True)
        print(f"[mdfnet-hydra] sweep summary: {out}", flush=True)
        if "evaluation" in config and config.evaluation.on_finish:
            if _other_processes_running(config, sweep_dir):
                print(
                    "[mdfnet-hydra] other processes still run trials of this study: the last to end evaluates the sweep",
                    flush=True,
                )
                return
            from mdfnet_hydra.evaluation import evaluate_quietly

            evaluation = evaluate_quietly(sweep_dir, sweep_dir / "evaluation", config.evaluation)
            if evaluation is not None:
                print(f"[mdfnet-hydra] evaluation: {evaluation / 'results.md'}", flush=True)


def _other_processes_running(config: DictConfig, sweep_dir: Path) -> bool:
    """Whether the sweep's study still has running trials, which can only be other processes'
    (several processes may share one study): evaluating now would leave those out."""
    db = sweep_dir / OPTUNA_DB
    if config.get("hparams") is None or not db.is_file():
        return False
    import optuna

    try:
        study = optuna.load_study(study_name=str(config.hparams.study_name), storage=f"sqlite:///{db}")
    except KeyError:
        return False
    return any(t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials(deepcopy=False))


USAGE = "usage: python -m mdfnet_hydra.summary <sweep directory>"


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 for a wrong command line, 1 for a directory that is not a sweep (nothing is
    written there), 0 with the CSV's path."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    sweep_dir = Path(args[0])
    try:
        rows = sweep_rows(sweep_dir)
    except NotASweepError as err:
        print(f"mdfnet_hydra.summary: error: {err}", file=sys.stderr)
        return 1
    for line in damaged_lines(rows):
        print(f"mdfnet_hydra.summary: {line}", file=sys.stderr)
    print(write_summary(sweep_dir, rows))
    return 0


class NotASweepError(ValueError):
    """The directory given is missing, or holds no job directories of a multirun."""


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """The sweep's rows; a missing directory, a single run or a directory without job directories
    is named instead of summarised as an empty table."""
    if not sweep_dir.exists():
        raise NotASweepError(f"{sweep_dir} does not exist")
    if not sweep_dir.is_dir():
        raise NotASweepError(f"{sweep_dir} is not a directory")
    rows = job_rows(sweep_dir)
    if rows:
        return rows
    if (sweep_dir / ".hydra" / "overrides.yaml").is_file():
        raise NotASweepError(
            f"{sweep_dir} is a single run, not a sweep; give the multirun's directory "
            f"(outputs/multiruns/<date>/<time>), whose job directories it summarises"
        )
    raise NotASweepError(
        f"{sweep_dir} holds no job directories (<job>/.hydra/overrides.yaml): give a multirun's "
        f"directory (outputs/multiruns/<date>/<time>)"
    )


if __name__ == "__main__":
    sys.exit(main())
