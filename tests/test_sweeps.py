"""Sweeps through the real entry point: Optuna presets with SQLite studies, resume, failures,
multi-objective, the experiment presets, the time budget and results_summary.csv."""

from __future__ import annotations

import csv
import json
import math
import sqlite3

import optuna
import pytest
from omegaconf import OmegaConf

from conftest import interrupted_cli, run_cli
from mdfnet_hydra.summary import SUMMARY_FILE
from mdfnet_hydra.summary import main as summary_main

TINY = ("debug=fast", "data.synthetic.num_samples=300", "data.synthetic.image_size=32")


def sweep(tmp_path, *overrides, expect_ok=True):
    result = run_cli("--multirun", *TINY, f"paths.root={tmp_path}", *overrides)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def load_study(sweep_dir):
    (name,) = optuna.get_all_study_names(storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def summary_rows(sweep_dir):
    with (sweep_dir / SUMMARY_FILE).open() as handle:
        return list(csv.DictReader(handle))


def test_bayesian_study_persists_and_resumes(tmp_path):
    common = ("hparams=bayesian", "modality=clinical", "stage=stage1")
    sweep(tmp_path, *common, "hparams.n_trials=2")
    sweep_dir = tmp_path / "sweeps" / "bayesian-clinical-stage1"
    study = load_study(sweep_dir)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    rows = summary_rows(sweep_dir)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    # every trial's value is the val mean AUROC its run directory recorded
    recorded = sorted(float(r["val_auroc_mean"]) for r in rows)
    assert sorted(t.value for t in study.trials) == pytest.approx(recorded)
    assert set(study.trials[0].params) == {
        "phases.stage1.lr",
        "phases.stage2.lr_encoders",
        "phases.stage2.lr_fusion",
        "optimizer.weight_decay",
        "model.fusion.dropout",
        "model.head.dropout1",
        "loss.bce_weight",
        "loss.focal_alpha",
        "loss.focal_gamma",
    }

    # the same command with a larger budget continues the study: one more trial, no collisions
    sweep(tmp_path, *common, "hparams.n_trials=3")
    study = load_study(sweep_dir)
    assert len(study.trials) == 3 and study.trials[2].state == optuna.trial.TrialState.COMPLETE
    assert study.trials[2].params != study.trials[0].params, "a resumed study does not redraw old trials"
    jobs = sorted(p.name for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 3 and len(summary_rows(sweep_dir)) == 3
    assert sorted(int(j.split("_")[0]) for j in jobs) == [t.number for t in study.trials], "<trial number>_<hash>"
    # and once the budget is reached, running it again trains nothing
    again = sweep(tmp_path, *common, "hparams.n_trials=3")
    assert "Launching" not in again.stdout + again.stderr
    assert len(load_study(sweep_dir).trials) == 3


def test_a_study_refuses_trials_that_are_not_comparable(tmp_path):
    """A debug study resumed by the real sweep (same command without debug=fast) must not run 0 trials
    and report the debug trial as best: it stops before any trial, naming what differs."""
    common = ("hparams=random", "modality=clinical", "stage=stage1", "hparams.n_trials=1", f"paths.root={tmp_path}")
    sweep_dir = tmp_path / "sweeps" / "random-clinical-stage1"
    assert run_cli("--multirun", *TINY, *common).returncode == 0
    real = run_cli("--multirun", *TINY[1:], *common)
    assert real.returncode != 0
    err = real.stderr
    assert "Study random-clinical-stage1 was created with other settings" in err
    assert "data.small_sample: 96 -> None" in err and "trainer.limit_train_batches: 4 -> None" in err
    assert "phases.stage1.lr" not in err, "the swept parameters differ between trials by design"
    assert "hparams.study_name=<new name>" in err
    assert "Launching" not in real.stdout + err and len(load_study(sweep_dir).trials) == 1

    # a study from before fingerprints adopts the settings of the next command that resumes it
    with sqlite3.connect(sweep_dir / "optuna.db") as db:
        db.execute("DELETE FROM study_user_attributes")
    adopted = run_cli("--multirun", *TINY[1:], *common)
    assert adopted.returncode == 0, adopted.stderr[-4000:]
    assert "adopting this command's settings" in adopted.stdout + adopted.stderr
    assert "data.small_sample: None -> 96" in run_cli("--multirun", *TINY, *common).stderr


def test_grid_records_failed_and_nan_trials_and_goes_on(tmp_path):
    result = sweep(
        tmp_path,
        "hparams=grid",
        "hparams/space=none",
        "modality=clinical",
        "stage=stage1",
        "optimizer=sgd",
        "model.fusion.heads=choice(4,3)",
        "phases.stage1.lr=choice(1e-3,1e20)",
        "hparams.max_failure_rate=0.9",
        "hparams.n_trials=4",
    )
    sweep_dir = tmp_path / "sweeps" / "grid-clinical-stage1"
    study = load_study(sweep_dir)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL"], states
    complete = [t for t in study.trials if t.state.name == "COMPLETE"][0]
    assert complete.params == {"model.fusion.heads": 4, "phases.stage1.lr": 1e-3}
    rows = {r["overrides"].split(" hparams")[0]: r for r in summary_rows(sweep_dir)}
    assert len(rows) == 4
    reasons = [r["reason"] for r in rows.values() if r["status"] == "failed"]
    diverged = [r for r in reasons if r.startswith("TrainingDiverged: stage1: training diverged: ")]  # lr 1e20
    assert len(diverged) == 1 and "try a lower learning rate (now phases.stage1.lr=1e+20)" in diverged[0], reasons
    assert sum("must be a multiple of model.fusion.heads (3)" in r for r in reasons) == 2, reasons  # refused at start
    assert "aborting the sweep" not in result.stdout + result.stderr


def test_too_many_failures_abort_the_sweep(tmp_path):
    result = sweep(
        tmp_path,
        "hparams=grid",
        "hparams/space=none",
        "modality=clinical",
        "stage=stage1",
        "model.fusion.heads=choice(3,5)",
        "hparams.n_trials=2",
        "hparams.max_failure_rate=0.25",
        expect_ok=False,
    )
    assert result.returncode != 0
    assert "aborting the sweep" in result.stdout + result.stderr


def test_random_search_multi_objective_pareto_front(tmp_path):
    result = sweep(
        tmp_path,
        "hparams=random",
        "hparams.objective=multi",
        "hparams.pruner.name=none",
        "hparams.n_trials=2",
        "modality=clinical",
        "stage=stage1",
    )
    assert "RandomSampler" in result.stdout + result.stderr
    sweep_dir = tmp_path / "sweeps" / "random-clinical-stage1"
    study = load_study(sweep_dir)
    assert len(study.directions) == 2
    rows = {r["job"]: r for r in summary_rows(sweep_dir)}
    for trial in study.trials:
        assert len(trial.values) == 2
        mean, minimum = trial.values
        assert minimum <= mean
    front = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert len(front.solutions) >= 1
    assert {tuple(s["values"]) for s in front.solutions} <= {tuple(t.values) for t in study.trials}
    assert all(float(r["val_auroc_min"]) <= float(r["val_auroc_mean"]) for r in rows.values())


@pytest.mark.slow  # 18 s: a multirun of several jobs
def test_baselines_preset_and_summary_rebuild(tmp_path):
    sweep(
        tmp_path,
        "experiment=baselines",
        "stage=stage1",
        f"hydra.sweep.dir={tmp_path / 'baselines'}",
        "evaluation.saliency_per_label=0",
        "evaluation.n_bootstrap=100",
    )
    sweep_dir = tmp_path / "baselines"
    rows = summary_rows(sweep_dir)
    assert [(r["job"], r["modality"], r["status"]) for r in rows] == [
        ("0_vision", "vision", "completed"),
        ("1_text", "text", "completed"),
        ("2_clinical", "clinical", "completed"),
    ]
    for r in rows:
        defined = [
            float(r[f"val_auroc/{n}"])
            for n in json.loads((sweep_dir / r["job"] / "metrics.json").read_text())["stages"]["stage1"]["val"]["auroc"]
            if r[f"val_auroc/{n}"] != ""
        ]
        assert float(r["val_auroc_mean"]) == pytest.approx(sum(defined) / len(defined), abs=1e-6)
        assert r["best_epoch"] == "1" and float(r["wall_time_s"]) > 0
    with (sweep_dir / "evaluation" / "results_summary.csv").open() as handle:
        evaluated = {r["run"]: r["modality"] for r in csv.DictReader(handle)}
    assert evaluated == {"0_vision/stage1": "vision", "1_text/stage1": "text", "2_clinical/stage1": "clinical"}, (
        "the multirun's end evaluates every run in the sweep"
    )
    assert (sweep_dir / "evaluation" / "auroc_by_label.png").is_file()
    assert not list(sweep_dir.glob("*/evaluation")), "jobs of a multirun leave the evaluation to the sweep's end"
    original = (sweep_dir / SUMMARY_FILE).read_text()
    (sweep_dir / SUMMARY_FILE).unlink()
    assert summary_main([str(sweep_dir)]) == 0
    assert (sweep_dir / SUMMARY_FILE).read_text() == original


def test_ablations_preset_lists_all_seven_combinations(cfg_factory):
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("train", overrides=["experiment=ablations"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.modality.split(",") == [
        "vision",
        "text",
        "clinical",
        "vision_text",
        "vision_clinical",
        "text_clinical",
        "all",
    ]


def test_time_budget_stops_cleanly_with_the_best_so_far(cfg_factory, tmp_path):
    from mdfnet_hydra.pipeline import run

    summary = run(cfg_factory("debug=fast", "modality=clinical", "phases.stage1.epochs=500", "trainer.max_time=4s"))
    stage1 = summary["stages"]["stage1"]
    assert stage1["stopped_by"] == "max_time" and 1 <= stage1["epochs_run"] < 500
    assert "stage2" not in summary["stages"], "no budget left for stage 2"
    assert summary["final_stage"] == "stage1" and math.isfinite(summary["objective"])
    assert summary["objective"] == pytest.approx(stage1["best"]["best_mean"]["value"], abs=0.05)
    nothing = run(cfg_factory("debug=fast", "modality=clinical", "trainer.max_time=0", run_dir=tmp_path / "zero"))
    assert nothing["objective"] is None and nothing["stages"] == {}


@pytest.mark.slow  # the SLURM tests run the same launcher family on a real cluster
def test_submitit_local_launcher_runs_the_same_jobs(tmp_path):
    sweep_dir = tmp_path / "local"
    sweep(
        tmp_path,
        "modality=clinical,text",
        "stage=stage1",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "trainer.device=cpu",  # submitit_local hides a node's GPUs without gpus_per_node (docs/sweeps.md)
        f"hydra.sweep.dir={sweep_dir}",
    )
    rows = summary_rows(sweep_dir)
    assert [(r["modality"], r["status"]) for r in rows] == [("clinical", "completed"), ("text", "completed")]
    assert (sweep_dir / ".submitit").is_dir(), "jobs went through submitit"


REFUSED = [
    (("hparams.objective=multi", "hparams.pruner.name=median"), "hparams.pruner needs hparams.objective=single"),
    (("hparams.pruner.name=asha", "hparams.pruner.reduction_factor=1"), "hparams.pruner.reduction_factor must be >= 2"),
    (("hparams.pruner.name=median", "hparams.pruner.interval_steps=0"), "hparams.pruner.interval_steps must be >= 1"),
    (("hparams.n_trials=0",), "hparams.n_trials must be >= 1"),
    (("hparams.objective=best",), "hparams.objective must be 'single' (val mean AUROC) or 'multi'"),
    (("loss.focal_gama=interval(1.0,3.0)",), "sweep parameter(s) loss.focal_gama name no key of the config"),
    (("loss.focal_alpha=interval(0.9,0.1)",), "sweep parameter 'loss.focal_alpha=interval(0.9,0.1)': "),
    # the config every trial shares: no trial would run
    (("trainer.max_grad_norm=-1",), "trainer.max_grad_norm must be > 0"),
]


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[m.split(" must")[0][:40] for _, m in REFUSED])
def test_a_sweep_it_cannot_run_is_refused_in_one_line_before_any_study(tmp_path, overrides, message):
    """What every trial would fail on (or a typo that would bind the study to a key that does not
    exist) stops the sweep process itself: one line, status 1, no study created."""
    result = run_cli("--multirun", *TINY, f"paths.root={tmp_path}", "hparams=random", "hparams/space=none",
                     "modality=clinical", "stage=stage1", "loss.focal_gamma=interval(1.0,3.0)", *overrides)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.startswith("mdfnet_hydra.train: error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Launching" not in result.stdout
    assert not list(tmp_path.glob("sweeps/*")), "no study, no summary, no directory"


def test_a_study_that_optimises_the_other_way_is_refused(tmp_path):
    """Optuna loads an existing study with its own direction whatever the command asks: a study
    made to minimise would report this sweep's worst AUROC as its best."""
    sweep_dir = tmp_path / "sweeps" / "random-clinical-stage1"
    sweep_dir.mkdir(parents=True)
    optuna.create_study(study_name="random-clinical-stage1", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    result = run_cli("--multirun", *TINY, f"paths.root={tmp_path}", "hparams=random", "modality=clinical",
                     "stage=stage1", "hparams.n_trials=1")  # fmt: skip
    assert result.returncode == 1
    assert (
        "error: Study random-clinical-stage1 in this storage was created to minimize; this command would maximize"
        in (result.stderr)
    )
    assert len(load_study(sweep_dir).trials) == 0


def test_a_storage_that_cannot_be_written_is_named_in_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    storage = f"sqlite:///{tmp_path / 'a_file' / 'x' / 'optuna.db'}"
    result = run_cli("--multirun", *TINY, f"paths.root={tmp_path}", "hparams=random", "modality=clinical",
                     "stage=stage1", "hparams.n_trials=1", f"hydra.sweeper.storage={storage}")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"mdfnet_hydra.train: error: hydra.sweeper.storage={storage}: the study cannot")
    assert len(result.stderr.strip().splitlines()) == 1
    under_a_file = run_cli("--multirun", *TINY, f"paths.root={tmp_path / 'a_file'}", "hparams=random", "stage=stage1")
    assert under_a_file.returncode == 1 and len(under_a_file.stderr.strip().splitlines()) == 1
    assert "error: the sweep directory " in under_a_file.stderr and "choose another paths.root" in under_a_file.stderr


def test_ctrl_c_ends_a_sweep_in_one_line_keeping_its_finished_trials(tmp_path):
    command = ["--multirun", *TINY, f"paths.root={tmp_path}", "hparams=random", "hparams/space=none",
               "modality=clinical", "stage=stage1", "loss.focal_gamma=interval(1.0,3.0)", "hparams.n_trials=200"]  # fmt: skip
    sweep_dir = tmp_path / "sweeps" / "random-clinical-stage1"
    status, stderr = interrupted_cli(
        *command, when=lambda: bool(list(sweep_dir.glob("2_*/stage1/checkpoints/last.pth")))
    )
    assert status == 130, stderr[-3000:]
    ours = [line for line in stderr.strip().splitlines() if not line.startswith("[I ")]  # (Optuna's own log)
    assert ours == [
        "mdfnet_hydra.train: sweep interrupted (Ctrl-C): finished trials are kept in the study; rerun the same "
        "command to go on (an unfinished trial is taken over and resumes)"
    ]
    states = [t.state for t in load_study(sweep_dir).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 2 and len(states) < 200
