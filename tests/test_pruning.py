"""Optuna pruning through Hydra's sweeper: a trial reports its validation mean AUROC after every
epoch into its own trial in the study's storage and stops when the pruner says so, recorded as
PRUNED (not failed, not complete), kept in the summary, never run again."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from conftest import SMALL_DATA, make_cfg, run_cli
from mdfnet_hydra.pruning import PruningTarget, TrialReporter, make_pruner

MEDIAN = {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2, "interval_steps": 1, "min_resource": 1,
          "reduction_factor": 3, "max_resource": None}  # fmt: skip
GAMMA = "loss.focal_gamma"


def finished_trials(study: optuna.Study, count: int, value: float, steps: int) -> None:
    """`count` finished trials that reported `value` after each of `steps` epochs."""
    for _ in range(count):
        study.add_trial(
            optuna.trial.create_trial(
                params={GAMMA: 2.0},
                distributions={GAMMA: FloatDistribution(1.0, 3.0)},
                value=value,
                intermediate_values={step: value for step in range(1, steps + 1)},
            )
        )


def test_each_pruner_name_makes_its_optuna_pruner():
    kinds = {
        name: type(make_pruner({**MEDIAN, "name": name})).__name__ for name in ("none", "median", "asha", "hyperband")
    }
    assert kinds == {"none": "NopPruner", "median": "MedianPruner", "asha": "SuccessiveHalvingPruner",
                     "hyperband": "HyperbandPruner"}  # fmt: skip


def test_hyperbands_whole_trial_is_the_configured_epochs_of_its_stages(cfg_factory):
    """Hyperband's brackets need a trial's length; Optuna's "auto" would take it from the first
    finished trial, which an early-stopped trial makes too short. Unset, it is the stages' epochs."""
    from mdfnet_hydra.pruning import pruner_settings

    spec = ("hparams=bayesian", "hparams.pruner.name=hyperband", "phases.stage1.epochs=15", "phases.stage2.epochs=30")
    settings = pruner_settings(cfg_factory(*spec))
    assert settings["max_resource"] == 15 + 30 and make_pruner(settings)._max_resource == 45
    assert pruner_settings(cfg_factory(*spec, "stage=stage2"))["max_resource"] == 30
    assert pruner_settings(cfg_factory(*spec, "hparams.pruner.max_resource=20"))["max_resource"] == 20


def test_a_trial_clearly_worse_than_finished_ones_is_pruned_after_the_warmup(tmp_path):
    """The median pruner with 2 warm-up steps: reports at epochs 1 and 2, pruned at epoch 2 (the
    earliest step Optuna prunes at is n_warmup_steps). The decision is kept on the trial at once:
    its job, killed before it has written its files and run again, stops again without reporting;
    once written, the trial is recorded PRUNED with what it reported."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    finished_trials(study, 3, 0.9, steps=6)
    running = study.ask()

    def reporter() -> TrialReporter:
        return TrialReporter(PruningTarget(storage, "s", running.number, MEDIAN, last_step=6))

    first = reporter()
    assert first.report(0.5, 1) is False, "within the warm-up"
    assert first.report(0.5, 2) is True
    assert reporter().report(0.95, 3) is True, "run again before its files were written: it stops again"
    trial = optuna.load_study(study_name="s", storage=storage).trials[running.number]
    assert trial.state == TrialState.RUNNING, "unfinished until its job has written its files"
    first.mark_pruned()
    trial = optuna.load_study(study_name="s", storage=storage).trials[running.number]
    assert trial.state == TrialState.PRUNED and trial.intermediate_values == {1: 0.5, 2: 0.5}
    assert reporter().report(0.9, 3) is True, "a finished trial is not reported to again"


def test_a_trial_as_good_as_finished_ones_is_not_pruned_and_undefined_epochs_are_not_reported(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    finished_trials(study, 3, 0.7, steps=6)
    reporter = TrialReporter(PruningTarget(storage, "s", study.ask().number, MEDIAN, last_step=6))
    assert [reporter.report(value, step) for step, value in enumerate([0.7, None, 0.8, math.nan], 1)] == [False] * 4
    assert reporter.trial.study.trials[-1].intermediate_values == {1: 0.7, 3: 0.8}


def test_the_presets_hyperband_pruner_stops_a_trial_that_falls_behind_at_its_first_rung(tmp_path):
    """The presets' pruner through the same reporter: Hyperband with one bracket (resources 1 to 2)
    keeps, at the rung of epoch 1, only the top third of the trials that reached it."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    hyperband = {**MEDIAN, "name": "hyperband", "min_resource": 1, "max_resource": 2, "reduction_factor": 3}

    def first_epoch(value: float) -> bool:
        return TrialReporter(PruningTarget(storage, "s", study.ask().number, hyperband, last_step=6)).report(value, 1)

    assert [first_epoch(v) for v in (0.9, 0.9, 0.9)] == [False] * 3, "each as good as the best so far"
    assert first_epoch(0.5) is True, "behind: not in the top third of the four at the rung"
    assert first_epoch(0.95) is False


def test_a_trial_at_its_last_epoch_completes_however_poor(tmp_path):
    """Stopping at the last epoch saves nothing: a trial that got there is reported and completes."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    finished_trials(study, 3, 0.9, steps=3)
    earlier = TrialReporter(PruningTarget(storage, "s", study.ask().number, MEDIAN, last_step=3))
    assert earlier.report(0.1, 2) is True, "an earlier epoch as poor stops a trial"
    reporter = TrialReporter(PruningTarget(storage, "s", study.ask().number, MEDIAN, last_step=3))
    assert reporter.report(0.1, 3) is False
    trial = optuna.load_study(study_name="s", storage=storage).trials[-1]
    assert trial.state == TrialState.RUNNING and trial.intermediate_values == {3: 0.1}


def test_a_job_stopped_between_saving_and_reporting_an_epoch_reports_it_when_resumed(
    tmp_path, output_root, monkeypatch
):
    """SLURM's timeout signal can land after an epoch's `last` is saved and before that epoch is
    reported (CI's requeue test met it once: the trial lost step 4). The resumed job reports the
    epoch from its checkpoint and takes the pruner's decision on it: here, finished trials that
    jump to 0.99 at step 2 make it stop at once, without training epoch 3."""
    from mdfnet_hydra.checkpoint import load_checkpoint
    from mdfnet_hydra.pipeline import run

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for _ in range(3):
        study.add_trial(
            optuna.trial.create_trial(
                params={GAMMA: 2.0},
                distributions={GAMMA: FloatDistribution(1.0, 3.0)},
                value=0.99,
                intermediate_values={1: 0.0, 2: 0.99, 3: 0.99},
            )
        )
    target = PruningTarget(storage, "s", study.ask().number, MEDIAN, last_step=3)  # prunes from step 2
    run_dir = tmp_path / "run"
    cfg = make_cfg(["modality=clinical", "stage=stage1", "debug=fast", "phases.stage1.epochs=3"], run_dir, output_root)
    report = TrialReporter.report

    def stopped_before_reporting_step_2(self, value, step):
        if step == 2:
            raise SystemExit(1)  # what submitit's handler ends the process with, after requeueing it
        return report(self, value, step)

    monkeypatch.setattr(TrialReporter, "report", stopped_before_reporting_step_2)
    with pytest.raises(SystemExit):
        run(cfg, pruning=target)
    last = run_dir / "stage1" / "checkpoints" / "last.pth"
    assert load_checkpoint(last)["epoch"] == 2
    assert list(optuna.load_study(study_name="s", storage=storage).trials[3].intermediate_values) == [1]

    monkeypatch.setattr(TrialReporter, "report", report)
    summary = run(cfg, pruning=target)
    trial = optuna.load_study(study_name="s", storage=storage).trials[3]
    saved = load_checkpoint(last)
    assert saved["epoch"] == 2, "pruned at the resumed epoch: epoch 3 never trained"
    assert list(trial.intermediate_values) == [1, 2]
    assert trial.intermediate_values[2] == pytest.approx(saved["metrics"]["auroc_mean"])
    assert summary["stages"]["stage1"]["stopped_by"] == "pruned"
    assert "stage1: pruned after epoch 2 (step 2)" in (run_dir / "logs" / "train.log").read_text()


def test_the_epoch_that_spends_the_time_budget_is_reported_too(tmp_path, output_root):
    from mdfnet_hydra.pipeline import run

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    finished_trials(study, 3, 0.5, steps=3)
    target = PruningTarget(storage, "s", study.ask().number, MEDIAN, last_step=3)
    # one step per epoch: the budget runs out on an epoch's last step, so the epoch is whole and counts
    overrides = ["modality=clinical", "stage=stage1", "debug=fast", "phases.stage1.epochs=3", "trainer.max_time=0.01s"]
    overrides += ["trainer.limit_train_batches=1", "trainer.grad_accum=1"]
    summary = run(make_cfg(overrides, tmp_path / "run", output_root), pruning=target)
    stage = summary["stages"]["stage1"]
    assert stage["stopped_by"] == "max_time" and stage["epochs_run"] == 1
    trial = optuna.load_study(study_name="s", storage=storage).trials[3]
    assert trial.intermediate_values == {1: pytest.approx(stage["val"]["auroc_mean"])}


def test_each_step_is_decided_once(tmp_path, caplog):
    """A requeued job reports the epoch it resumed from again: the step keeps its first value and
    the decision taken then (going on; a stop would have recorded the trial as PRUNED), whatever
    the study holds by now; a different value is named in a warning, not reported."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    finished_trials(study, 3, 0.5, steps=6)
    number = study.ask().number
    assert TrialReporter(PruningTarget(storage, "s", number, MEDIAN, last_step=6)).report(0.6, 2) is False
    finished_trials(study, 3, 0.9, steps=6)  # the study moves on: 0.6 at step 2 is now below the median
    again = TrialReporter(PruningTarget(storage, "s", number, MEDIAN, last_step=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns of a step reported twice: the reporter does not repeat it
        assert again.report(0.6, 2) is False, "decided when first reported"
    assert again.report(0.3, 2) is False and "already holds 0.600000 at step 2" in caplog.text
    assert optuna.load_study(study_name="s", storage=storage).trials[number].intermediate_values == {2: 0.6}
    assert again.report(0.6, 3) is True, "the next step is decided against the study as it is now"


def study_of_good_trials(root, name: str) -> tuple:
    """A study in `root`'s sweep directory holding three finished trials that reached a val mean
    AUROC of 0.99 at every one of three epochs: a tiny debug trial cannot keep up with them."""
    sweep_dir = root / "sweeps" / name
    sweep_dir.mkdir(parents=True)
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    finished_trials(optuna.create_study(study_name=name, storage=storage, direction="maximize"), 3, 0.99, steps=3)
    return sweep_dir, storage


def pruned_sweep_command(root, name: str, trials: int, *extra: str) -> list[str]:
    """A random search of `trials` more trials on that study, median pruner after one warm-up epoch."""
    return ["--multirun", "hparams=random", "hparams/space=none", f"{GAMMA}=interval(1.0,3.0)",
            f"hparams.study_name={name}", f"hparams.n_trials={3 + trials}", "hparams.pruner.name=median",
            "hparams.pruner.n_startup_trials=3", "hparams.pruner.n_warmup_steps=1", "modality=clinical",
            "stage=stage1", "debug=fast", "phases.stage1.epochs=3", f"paths.root={root}", *extra]  # fmt: skip


def assert_pruned_at_first_epoch(sweep_dir, storage, name: str, numbers: list[int]) -> None:
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert [trials[n].state for n in numbers] == [TrialState.PRUNED] * len(numbers)
    assert all(list(trials[n].intermediate_values) == [1] for n in numbers)
    for n in numbers:
        (job,) = sweep_dir.glob(f"{n}_*")
        assert json.loads((job / "metrics.json").read_text())["pruned"] == {"stage": "stage1", "epoch": 1, "step": 1}


@pytest.fixture(scope="module")
def pruned_sweep(tmp_path_factory):
    """A random-search study holding three finished trials that reached a val mean AUROC of 0.99 at
    every epoch, then one real trial (stage 1, three epochs) that cannot: pruned after epoch 1."""
    root = tmp_path_factory.mktemp("pruned_sweep")
    sweep_dir, storage = study_of_good_trials(root, "pruned")
    command = pruned_sweep_command(root, "pruned", 1, *SMALL_DATA)
    first = run_cli(*command, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    again = run_cli(*command, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    return sweep_dir, storage, first, again


def test_the_pruned_trial_stops_cleanly_and_the_study_records_it_as_pruned(pruned_sweep):
    sweep_dir, storage, first, _ = pruned_sweep
    trial = optuna.load_study(study_name="pruned", storage=storage).trials[3]
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [1] and trial.intermediate_values[1] < 0.99
    (job,) = sweep_dir.glob("3_*")
    summary = json.loads((job / "metrics.json").read_text())
    assert summary["pruned"] == {"stage": "stage1", "epoch": 1, "step": 1}
    stage = summary["stages"]["stage1"]
    assert stage["stopped_by"] == "pruned" and stage["epochs_run"] == 1 and stage["val"]["auroc_mean"] is not None
    assert (job / "stage1" / "checkpoints" / "best_mean.pth").is_file() and (
        job / "stage1" / "predictions" / "test.npz"
    ).is_file()
    assert not (job / "failure.json").exists(), "a pruned trial is not a failure"
    assert "stage1: pruned after epoch 1 (step 1)" in (job / "logs" / "train.log").read_text()


def test_the_summary_says_pruned_and_where(pruned_sweep):
    sweep_dir, _, _, _ = pruned_sweep
    with (sweep_dir / "results_summary.csv").open() as handle:
        rows = {row["job"].split("_")[0]: row for row in csv.DictReader(handle)}
    assert rows["3"]["status"] == "pruned" and rows["3"]["pruned_at"] == "stage1 epoch 1 (step 1)"
    assert rows["3"]["stopped_by"] == "pruned"


def test_a_resumed_sweep_does_not_run_the_pruned_trial_again(pruned_sweep):
    sweep_dir, storage, _, again = pruned_sweep
    study = optuna.load_study(study_name="pruned", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    (job,) = sweep_dir.glob("3_*")
    assert (job / "logs" / "train.log").read_text().count("stage1: pruned after epoch 1") == 1
    assert "running it again" not in again.stdout + again.stderr


def test_a_trial_its_pruner_stopped_whose_sweep_was_killed_is_finished_by_the_next_sweep(tmp_path):
    """The sweep was killed after the pruner stopped trial 3 at step 2 and before its job wrote its
    files: the trial is still RUNNING with its decision on it, so the rerun takes it over, and its
    job (here from the start: its checkpoints were lost too) stops at that step without reporting,
    writes its files and records it PRUNED."""
    from mdfnet_hydra.pruning import PRUNED_AT_ATTR

    sweep_dir, storage = study_of_good_trials(tmp_path, "killed")
    study = optuna.load_study(study_name="killed", storage=storage)
    orphan = study.ask()  # no live sweep process owns it
    study._storage.set_trial_system_attr(orphan._trial_id, PRUNED_AT_ATTR, 2)
    result = run_cli(*pruned_sweep_command(tmp_path, "killed", 1, *SMALL_DATA), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    trial = optuna.load_study(study_name="killed", storage=storage).trials[orphan.number]
    assert trial.state == TrialState.PRUNED and trial.intermediate_values == {}
    (job,) = sweep_dir.glob(f"{orphan.number}_*")
    summary = json.loads((job / "metrics.json").read_text())
    assert summary["pruned"] == {"stage": "stage1", "epoch": 2, "step": 2}
    assert summary["stages"]["stage1"]["epochs_run"] == 2


@pytest.mark.slow  # two data-parallel workers: about a minute on 2 CPU cores
def test_the_ranks_of_a_data_parallel_trial_stop_together(tmp_path):
    """Rank 0 reports and asks; every rank learns the decision in the same epoch (a rank that went
    on alone would wait for the others in its next collective, and the job would never end)."""
    sweep_dir, storage = study_of_good_trials(tmp_path, "ddp")
    command = pruned_sweep_command(tmp_path, "ddp", 1, "trainer.nproc_per_node=2", "data.num_workers=0", *SMALL_DATA)
    result = run_cli(*command, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_pruned_at_first_epoch(sweep_dir, storage, "ddp", [3])
    (job,) = sweep_dir.glob("3_*")
    assert "world size 2" in (job / "logs" / "train.log").read_text()


def test_two_trials_of_one_batch_report_into_one_study_at_once(tmp_path):
    """submitit_local runs a batch of hydra.sweeper.n_jobs=2 trials as two processes at the same
    time: both report into the one SQLite study (no lost report, no "database is locked")."""
    sweep_dir, storage = study_of_good_trials(tmp_path, "pair")
    command = pruned_sweep_command(tmp_path, "pair", 2, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                                   "hydra.sweeper.n_jobs=2", "trainer.device=cpu", *SMALL_DATA)  # fmt: skip
    result = run_cli(*command, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (sweep_dir / ".submitit").is_dir(), "the trials went through submitit"
    assert_pruned_at_first_epoch(sweep_dir, storage, "pair", [3, 4])
    assert "database is locked" not in result.stdout + result.stderr


def test_a_pruner_with_two_objectives_is_refused_at_start(cfg_factory):
    from mdfnet_hydra.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="hparams.pruner needs hparams.objective=single"):
        validate_config(cfg_factory("hparams=random", "hparams.objective=multi", "hparams.pruner.name=median"))
    validate_config(cfg_factory("hparams=random", "hparams.pruner.name=asha"))


@pytest.mark.slow  # two small searches
def test_the_search_cost_benchmark_compares_the_same_search_with_and_without_pruning(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.benchmarks.sweep_cost", "--trials", "4", "--pruner", "median",
         "--out", str(tmp_path / "cost"),
         "modality=clinical", "stage=stage1", "phases.stage1.epochs=3", "data.small_sample=96",
         "trainer.limit_train_batches=4", "hparams.pruner.n_startup_trials=2", "hparams.pruner.n_warmup_steps=1",
         *SMALL_DATA],  # fmt: skip
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    costs = json.loads((tmp_path / "cost" / "sweep_cost.json").read_text())
    assert set(costs) == {"none", "median"} and costs["none"]["trials"] == costs["median"]["trials"] == 4
    assert costs["none"]["pruned"] == 0 and costs["none"]["epochs"] == 4 * 3
    assert costs["median"]["epochs"] <= 4 * 3, "a pruned trial trains fewer epochs, never more"
    assert "epochs spent:" in result.stdout and "best val AUROC" in result.stdout
