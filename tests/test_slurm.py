"""Submission to a real SLURM cluster (CI starts one: .ci/slurm/start-local-slurm.sh).

Skipped where no cluster answers, unless MDFNET_REQUIRE_SLURM=1 (as in CI), where that is a failure.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from mdfnet_hydra.checkpoint import load_checkpoint
from mdfnet_hydra.summary import SUMMARY_FILE


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return probe.returncode == 0 and any(s in probe.stdout for s in ("idle", "mixed", "allocated"))


if not _cluster_up():
    if os.environ.get("MDFNET_REQUIRE_SLURM") == "1":
        raise RuntimeError("MDFNET_REQUIRE_SLURM=1 but no SLURM cluster answers (start .ci/slurm/start-local-slurm.sh)")
    pytest.skip("no SLURM cluster (CI starts one with .ci/slurm/start-local-slurm.sh)", allow_module_level=True)

pytestmark = pytest.mark.slurm

TINY = ("debug=fast", "data.synthetic.num_samples=300", "data.synthetic.image_size=32")
# a 2-core test node: one CPU per task, two tasks at once
SMALL_JOBS = (
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=20",
    "hydra.launcher.array_parallelism=2",
    'hydra.launcher.setup=["export HF_HUB_OFFLINE=1"]',
)


def submitted(sweep_dir: Path) -> list[str]:
    """SLURM ids of the submitit job folders: "12_0" ... for array tasks, "12" for a lone job."""
    folder = sweep_dir / ".submitit"
    names = sorted(p.name for p in folder.iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)) if folder.is_dir() else []
    tasks = [n for n in names if "_" in n]  # an array also has a folder of its own for the submission script
    return tasks or names


def timeout_signal_after_epoch_2(proc: subprocess.Popen, sweep_dir: Path, job: str) -> tuple[int | None, str]:
    """Once the job directory matching `job` has checkpointed its second epoch, send its SLURM job
    what SLURM sends signal_delay_s before the time limit; wait for the sweep. Returns the epoch it
    was signalled at (None: never) and the sweep's output."""
    return signal_after_epoch(proc, sweep_dir, job, "USR2", 2)


def signal_after_epoch(
    proc: subprocess.Popen, sweep_dir: Path, job: str, signal: str, epoch: int
) -> tuple[int | None, str]:
    """Once the job directory matching `job` has checkpointed `epoch`, send `signal` to every process
    of the first SLURM job (or array task) of the sweep; wait for the sweep. Returns the epoch it was
    signalled at (None: never) and the sweep's output."""
    signalled_at = None
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None and signalled_at is None:
            last = next(sweep_dir.glob(f"{job}/stage1/checkpoints/last.pth"), None)
            if last is not None and load_checkpoint(last)["epoch"] >= epoch and submitted(sweep_dir):
                signalled_at = load_checkpoint(last)["epoch"]
                subprocess.run(["scancel", f"--signal={signal}", "--full", submitted(sweep_dir)[0]], check=True)
            time.sleep(0.5)
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        # also after a sweep that ended: a job it gave up on may be requeued, and would take the
        # cluster's CPUs from the tests that follow (CI, 2026-11-28)
        if submitted(sweep_dir):
            subprocess.run(["scancel", *submitted(sweep_dir)], capture_output=True)
    return signalled_at, output


def array_ids(sweep_dir: Path) -> set[str]:
    return {name.split("_")[0] for name in submitted(sweep_dir)}


def final_states(job_id: str, wait_s: float = 60) -> list[str]:
    """sacct states of an array's tasks once SLURM has finished them (results can land first)."""
    deadline = time.time() + wait_s
    while True:
        accounting = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True, text=True
        )
        states = [line.split("|")[1] for line in accounting.stdout.split()]
        if all(s not in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED") for s in states) or time.time() > deadline:
            return states
        time.sleep(1)


@pytest.mark.slow
def test_ablations_run_as_one_job_array(tmp_path):
    sweep_dir = tmp_path / "ablations"
    result = run_cli(
        "--multirun",
        "experiment=ablations",
        *TINY,
        *SMALL_JOBS,
        f"paths.root={tmp_path}",
        f"hydra.sweep.dir={sweep_dir}",
        "evaluation.saliency_per_label=0",
        "evaluation.n_bootstrap=100",
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ids = array_ids(sweep_dir)
    assert len(ids) == 1, f"one SLURM job array, got {ids}"
    assert len(submitted(sweep_dir)) == 7 and all("_" in name for name in submitted(sweep_dir))
    states = final_states(ids.pop())
    assert states == ["COMPLETED"] * 7, states
    with (sweep_dir / SUMMARY_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["modality"] for r in rows] == [
        "vision",
        "text",
        "clinical",
        "vision_text",
        "vision_clinical",
        "text_clinical",
        "all",
    ]
    assert all(r["status"] == "completed" and float(r["val_auroc_mean"]) > 0 for r in rows)
    for row in rows:
        job = sweep_dir / row["job"]
        assert (job / "stage2" / "checkpoints" / "best_mean.pth").is_file()
        assert (job / "stage2" / "predictions" / "test.npz").is_file()
    # the sweep's end evaluates all 14 stage runs and compares every multimodal one with vision-only
    with (sweep_dir / "evaluation" / "comparisons.csv").open() as handle:
        pairs = {(r["run"], r["baseline"]) for r in csv.DictReader(handle) if r["label"].startswith("mean AUROC")}
    multimodal = [r["job"] for r in rows if "_" in r["modality"] or r["modality"] == "all"]
    assert pairs == {(f"{job}/{stage}", f"0_vision/{stage}") for job in multimodal for stage in ("stage1", "stage2")}


def test_job_with_two_tasks_trains_data_parallel(tmp_path, without_omp_num_threads):
    sweep_dir = tmp_path / "ddp"
    result = run_cli(
        "--multirun",
        "modality=clinical",
        "stage=stage1",
        *TINY,
        *SMALL_JOBS,
        "hydra.launcher.tasks_per_node=2",
        f"paths.root={tmp_path}",
        f"hydra.sweep.dir={sweep_dir}",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    log = (sweep_dir / "0" / "logs" / "train.log").read_text()
    assert "world size 2 (backend gloo, rank 0)" in log
    # the local cluster binds no task to a core: each rank sees both CPUs, and computes on its one
    assert "machine: 1 CPU, no CUDA; 1 compute thread(s) (SLURM's allocation)" in log
    assert "effective batch 64 = 16 per device x 2 worker(s)" in log
    assert json.loads((sweep_dir / "0" / "metrics.json").read_text())["objective"] is not None


@pytest.mark.slow
def test_timeout_signal_requeues_and_resumes_from_checkpoint(tmp_path):
    sweep_dir = tmp_path / "requeue"
    epochs = 12
    command = [
        sys.executable,
        "-m",
        "mdfnet_hydra.train",
        "--multirun",
        "modality=vision_text",
        "stage=stage1",
        *TINY,
        *SMALL_JOBS,
        "hydra.launcher.max_num_timeout=2",
        f"phases.stage1.epochs={epochs}",
        "trainer.limit_train_batches=null",
        "data.small_sample=null",
        "trainer.global_batch_size=8",
        f"paths.root={tmp_path}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    signalled_at, output = timeout_signal_after_epoch_2(proc, sweep_dir, "0")
    assert signalled_at is not None and signalled_at < epochs, output[-3000:]
    assert proc.returncode == 0, output[-4000:]
    log = (sweep_dir / "0" / "stage1" / "logs" / "train.log").read_text()
    resumed = [int(e) for e in re.findall(r"stage1: resumed from .*last\.pth after epoch (\d+)", log)]
    assert resumed and resumed[0] >= signalled_at, log[-3000:]
    assert log.count(f"stage1 epoch 1/{epochs} |") == 1, "the requeued job continues, it does not start over"
    metrics = json.loads((sweep_dir / "0" / "stage1" / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs
    submitit_logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in submitit_logs


@pytest.mark.slow
def test_a_pruned_sweep_runs_as_one_job_array(tmp_path):
    """Three trials of a pruned random search as one SLURM job array: each job reports into the one
    study and, behind three finished trials it cannot keep up with, is pruned after its first epoch."""
    from test_pruning import assert_pruned_at_first_epoch, pruned_sweep_command, study_of_good_trials

    sweep_dir, storage = study_of_good_trials(tmp_path, "slurm")
    command = pruned_sweep_command(tmp_path, "slurm", 3, *TINY[1:], *SMALL_JOBS, "hydra.sweeper.n_jobs=3")
    result = run_cli(*command, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    ids = array_ids(sweep_dir)
    assert len(ids) == 1 and len(submitted(sweep_dir)) == 3, submitted(sweep_dir)
    assert final_states(ids.pop()) == ["COMPLETED"] * 3
    assert_pruned_at_first_epoch(sweep_dir, storage, "slurm", [3, 4, 5])
    with (sweep_dir / SUMMARY_FILE).open() as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["pruned"] * 3


@pytest.mark.slow
def test_a_requeued_trial_keeps_reporting_to_its_trial(tmp_path):
    """A pruned sweep's trial on SLURM gets the timeout signal after its second epoch: the requeued
    job resumes and reports its later epochs into the same trial number, which the pruner stops
    at step 6, where the finished trials (0.0 until then) jump to 0.99."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from test_pruning import GAMMA, pruned_sweep_command

    sweep_dir = tmp_path / "sweeps" / "requeue"
    sweep_dir.mkdir(parents=True)
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    study = optuna.create_study(study_name="requeue", storage=storage, direction="maximize")
    for _ in range(3):  # finished trials at 0.0 for five epochs, then 0.99
        study.add_trial(
            optuna.trial.create_trial(
                params={GAMMA: 2.0},
                distributions={GAMMA: FloatDistribution(1.0, 3.0)},
                value=0.99,
                intermediate_values={step: 0.0 if step <= 5 else 0.99 for step in range(1, 9)},
            )
        )
    command = [sys.executable, "-m", "mdfnet_hydra.train",
               *pruned_sweep_command(tmp_path, "requeue", 1, *TINY[1:], *SMALL_JOBS, "hydra.launcher.max_num_timeout=2",
                                     "phases.stage1.epochs=8", "trainer.limit_train_batches=null",
                                     "data.small_sample=null", "trainer.global_batch_size=8")]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    signalled_at, output = timeout_signal_after_epoch_2(proc, sweep_dir, "3_*")
    assert signalled_at is not None and proc.returncode == 0, output[-4000:]
    trials = optuna.load_study(study_name="requeue", storage=storage).trials
    assert len(trials) == 4 and trials[3].state == TrialState.PRUNED
    assert sorted(trials[3].intermediate_values) == [1, 2, 3, 4, 5, 6], "every epoch reported once, to trial 3"
    (job,) = sweep_dir.glob("3_*")
    log = (job / "stage1" / "logs" / "train.log").read_text()
    assert re.search(r"stage1: resumed from .*last\.pth after epoch \d+", log), log[-3000:]
    assert "stage1: pruned after epoch 6 (step 6)" in log
    assert "Requeued job" in "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.*"))


def _killed_at_first_run(marker: Path) -> list[str]:
    """A job command that, at its first run, kills its own submitit process (no result file: sacct
    says FAILED) and at a later run prints "second run"."""
    script = f'if [ -e "{marker}" ]; then echo second run; else touch "{marker}"; kill -9 $PPID; fi'
    return ["sh", "-c", script]


def _job_over(job_id: str, wait_s: float = 60) -> str:
    deadline = time.time() + wait_s
    while time.time() < deadline:
        state = final_states(job_id.split("_")[0], wait_s=0)
        if state and state[0] not in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED"):
            return state[0]
        time.sleep(0.5)
    raise AssertionError(f"SLURM job {job_id} did not end in {wait_s} s")


@pytest.mark.slow
def test_the_launcher_waits_for_a_job_requeued_after_accounting_called_it_failed(tmp_path):
    """Around a requeue, sacct can report a job FAILED while squeue has it pending again (CI lost a
    sweep that way): submitit's own watcher takes that for the end; the launcher's wait does not, and
    returns the requeued run's result. A job that is over without a result still fails the wait."""
    import submitit
    from submitit.core.utils import UncompletedJobError

    from mdfnet_hydra.slurm_launcher import settled_result, still_queued

    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1)
    job = executor.submit(submitit.helpers.CommandFunction(_killed_at_first_run(tmp_path / "marker")))
    assert _job_over(job.job_id) == "FAILED"
    assert job.done(force_check=True) and not job.paths.result_pickle.exists(), "submitit alone gives up here"
    assert still_queued(job.job_id) is False
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    # SLURM would start it in 2 minutes; at once, slurmd can still hold the last run's credential as
    # revoked ("Killing non-startable batch job: Job credential revoked", 3 of 8 runs under load)
    subprocess.run(["scontrol", "update", f"jobid={job.job_id}", "starttime=now+10"], check=True)
    assert still_queued(job.job_id) is True
    started = time.monotonic()
    assert settled_result(job, poll_s=2).strip() == "second run"
    assert time.monotonic() - started < 120

    lost = executor.submit(submitit.helpers.CommandFunction(["sh", "-c", "kill -9 $PPID"]))
    started = time.monotonic()
    with pytest.raises(UncompletedJobError, match="has not produced any output"):
        settled_result(lost, poll_s=2)
    assert time.monotonic() - started < 120

    executor.update_parameters(slurm_additional_parameters={"hold": True})  # pending until a person releases it
    held = executor.submit(submitit.helpers.CommandFunction(["true"]))
    try:
        state = subprocess.run(["squeue", "-h", "-o", "%T %r", "-j", held.job_id], capture_output=True, text=True)
        assert state.stdout.split()[0] == "PENDING" and "Held" in state.stdout, state.stdout
        assert still_queued(held.job_id) is False, "a held job is not waited for"
    finally:
        subprocess.run(["scancel", held.job_id])


@pytest.mark.slow
def test_killed_trials_are_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
    """Of a three-job array (two at a time), trial 0 is killed mid-training (SIGKILL, as the kernel's
    out-of-memory killer does) and trial 2 is cancelled while it waits, before it has a directory:
    the sweep waits for trial 1, records the other two as failed trials with the reason in their
    failure.json (and the summary), and ends normally (2 failures of 3 allowed)."""
    import optuna
    from optuna.trial import TrialState

    sweep_dir = tmp_path / "sweeps" / "killed"
    command = [sys.executable, "-m", "mdfnet_hydra.train", "--multirun", "hparams=random", "hparams/space=none",
               "loss.focal_gamma=interval(1.0,3.0)", "hparams.study_name=killed", "hparams.n_trials=3",
               "hparams.max_failure_rate=0.7", "hydra.sweeper.n_jobs=3", "modality=clinical", "stage=stage1",
               *TINY, *SMALL_JOBS, "phases.stage1.epochs=30", "trainer.limit_train_batches=null",
               "data.small_sample=null", "trainer.global_batch_size=8", f"paths.root={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 300
    while len(submitted(sweep_dir)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if len(submitted(sweep_dir)) == 3:  # the array's third task, held back by array_parallelism=2
        subprocess.run(["scancel", submitted(sweep_dir)[2]], check=True)
    killed_at, output = signal_after_epoch(proc, sweep_dir, "0_*", "KILL", 1)  # trial 0: the array's first task
    assert killed_at is not None and killed_at < 30 and proc.returncode == 0, output[-4000:]
    trials = optuna.load_study(study_name="killed", storage=f"sqlite:///{sweep_dir / 'optuna.db'}").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    (job,) = sweep_dir.glob("0_*")
    assert "ended without a result" in json.loads((job / "failure.json").read_text())["reason"]
    assert "ended without a result" in json.loads((sweep_dir / "2_lost" / "failure.json").read_text())["reason"]
    with (sweep_dir / SUMMARY_FILE).open() as handle:
        assert {r["job"]: r["status"] for r in csv.DictReader(handle)}[job.name] == "failed"


def task_processes(sweep_dir: Path, procid: int) -> list[int]:
    """PIDs of the local cluster's task `procid` of the sweep's jobs (its python runs submitit on a
    folder under the sweep directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # not a process, gone, or not ours to read
            continue
        if (
            str(sweep_dir).encode() in command
            and b"submitit" in command
            and f"SLURM_PROCID={procid}".encode() in environ
        ):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_task_that_dies_ends_its_jobs_other_tasks_at_once(tmp_path):
    """Task 1 of a two-task job is killed (SIGKILL, as the out-of-memory killer does) as soon as it
    starts, before it joins the process group. Without srun's --kill-on-bad-exit (SLURM's default)
    task 0 would wait for it in the rendezvous for the process group's timeout (30 minutes) holding
    its allocation; with it (the launcher's default) SLURM ends task 0 at once and the sweep records
    the job as lost."""
    sweep_dir = tmp_path / "dies"
    command = [sys.executable, "-m", "mdfnet_hydra.train", "--multirun", "modality=clinical", "stage=stage1",
               *TINY, *SMALL_JOBS, "hydra.launcher.tasks_per_node=2", f"paths.root={tmp_path}",
               f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline, killed = time.time() + 300, None
        while killed is None and time.time() < deadline and proc.poll() is None:
            for pid in task_processes(sweep_dir, 1):
                os.kill(pid, 9)
                killed = time.time()
            time.sleep(0.05)
        assert killed is not None, "task 1 never started"
        output, _ = proc.communicate(timeout=240)  # 30 minutes without the option
        ended_after = time.time() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", *submitted(sweep_dir)])
    assert proc.returncode != 0 and "ended without a result" in output, output[-4000:]
    (script,) = (sweep_dir / ".submitit").glob("*/*_submission.sh")
    assert "--kill-on-bad-exit=1" in script.read_text()
    assert ended_after < 200, f"the job's other task ended {ended_after:.0f} s after task 1 died"
