"""results_summary.csv from job directories written here without training (the files summary.py reads)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from mdfnet_hydra.summary import SUMMARY_FILE, WriteSummary, main


def write_job(sweep: Path, name: str, auroc: float = 0.7) -> Path:
    """A finished job directory: Hydra's overrides and config, and the job's metrics.json."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- seed={name.split('_')[0]}\n")
    (job / ".hydra" / "config.yaml").write_text("modality:\n  name: all\nstage:\n  name: two_stage\n")
    stage = {"val": {"auroc_mean": auroc}, "test": {"auroc_mean": auroc}, "best_epoch": 1, "wall_time_s": 2.0}
    (job / "metrics.json").write_text(
        json.dumps({"objective": auroc, "final_stage": "stage2", "stages": {"stage2": stage}})
    )
    return job


def rows_of(sweep: Path) -> dict[str, dict[str, str]]:
    with (sweep / SUMMARY_FILE).open() as handle:
        return {row["job"]: row for row in csv.DictReader(handle)}


def damaged_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    write_job(sweep, "0_ok", 0.8)
    (write_job(sweep, "1_metrics") / "metrics.json").write_text('{"objective": 0.5, "stages": ')
    (write_job(sweep, "2_overrides") / ".hydra" / "overrides.yaml").write_text("garbage: [\n")
    (write_job(sweep, "3_shape") / "metrics.json").write_text("[1, 2]")
    return sweep


def test_a_damaged_job_file_gets_a_damaged_row_and_the_others_are_summarised(tmp_path, capsys):
    sweep = damaged_sweep(tmp_path)
    assert main([str(sweep)]) == 0
    rows = rows_of(sweep)
    assert list(rows) == ["0_ok", "1_metrics", "2_overrides", "3_shape"]
    assert rows["0_ok"]["status"] == "completed" and rows["0_ok"]["val_auroc_mean"] == "0.8"
    assert rows["1_metrics"]["status"] == "damaged" and rows["1_metrics"]["val_auroc_mean"] == ""
    assert rows["1_metrics"]["reason"].startswith("metrics.json is damaged: JSONDecodeError: Expecting value")
    assert rows["1_metrics"]["overrides"] == "seed=1" and rows["1_metrics"]["modality"] == "all"
    assert rows["2_overrides"]["status"] == "damaged"
    assert rows["2_overrides"]["reason"].startswith(".hydra/overrides.yaml is damaged:")
    assert rows["3_shape"]["status"] == "damaged" and rows["3_shape"]["reason"].startswith("metrics.json is damaged:")
    err = capsys.readouterr().err
    assert "mdfnet_hydra.summary: warning: job 1_metrics: metrics.json is damaged" in err and "Traceback" not in err


def test_the_end_of_sweep_callback_writes_the_summary_despite_a_damaged_job(tmp_path, capsys):
    sweep = damaged_sweep(tmp_path)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    WriteSummary().on_multirun_end(config)
    assert {job: row["status"] for job, row in rows_of(sweep).items()} == {
        "0_ok": "completed",
        "1_metrics": "damaged",
        "2_overrides": "damaged",
        "3_shape": "damaged",
    }
    assert "[mdfnet-hydra] warning: job 2_overrides: .hydra/overrides.yaml is damaged" in capsys.readouterr().out
