"""Faults and hostile inputs, done as a user meets them: real jobs through the real entry point,
then a damaged, deleted or stale file, a full disk, a second job in the same directory, a config
that names arbitrary code. Each asserts that nothing is lost, the rerun completes (to the same
metrics as a run that never failed) or fails naming the file and what to do, and nothing executes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_encoders import save_hf_encoder

from conftest import SMALL_DATA, make_cfg, run_cli
from mdfnet_hydra.checkpoint import load_checkpoint

# two stages of the clinical-only model (fastest), stage 1 with two epochs and a periodic
# checkpoint each epoch: enough state to damage in every way that matters
JOB = ["debug=fast", "modality=clinical", "phases.stage1.epochs=2", *SMALL_DATA]


def job(run_dir: Path, output_root: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli(*JOB, f"paths.root={output_root}", f"hydra.run.dir={run_dir}", *extra, **kwargs)


def final_metrics(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "metrics.json").read_text())
    return {
        stage: (r["val"]["auroc_mean"], r["val"]["loss"], r["test"]["auroc_mean"])
        for stage, r in summary["stages"].items()
    }


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory, output_root) -> Path:
    """A finished job that nothing went wrong in: every test damages a copy of it."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    ok(job(run_dir, output_root))
    return run_dir


@pytest.fixture
def copy_of(reference, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(reference, target)
    return target


def test_a_half_written_metrics_file_is_named_and_the_rerun_finishes_the_stage(copy_of, reference, output_root):
    metrics = copy_of / "stage1" / "metrics.json"
    metrics.write_bytes(metrics.read_bytes()[:200])  # what a full disk left: the start of the JSON
    result = ok(job(copy_of, output_root))
    assert f"{metrics} is damaged" in result.stdout + result.stderr
    json.loads(metrics.read_text())
    assert final_metrics(copy_of) == final_metrics(reference)


def test_a_truncated_last_checkpoint_falls_back_to_the_newest_valid_epoch_checkpoint(copy_of, reference, output_root):
    stage1 = copy_of / "stage1"
    last = stage1 / "checkpoints" / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (stage1 / "checkpoints" / "epoch_002.pth").unlink()
    for done in (stage1 / "metrics.json", copy_of / "metrics.json"):
        done.unlink()  # the job was stopped during stage 1's second epoch
    shutil.rmtree(copy_of / "stage2")
    result = ok(job(copy_of, output_root))
    log = result.stdout + result.stderr
    assert f"checkpoint {last} is damaged or incomplete" in log and "resuming from epoch_001.pth instead" in log
    assert final_metrics(copy_of) == final_metrics(reference), "epoch 2 retrained exactly as the first time"


def test_a_deleted_last_checkpoint_without_a_resumable_one_is_refused_not_trained_over(copy_of, output_root):
    checkpoints = copy_of / "stage1" / "checkpoints"
    for path in [checkpoints / "last.pth", *checkpoints.glob("epoch_*.pth"), copy_of / "stage1" / "metrics.json"]:
        path.unlink()
    best = (checkpoints / "best_mean.pth").read_bytes()
    result = job(copy_of, output_root)
    assert result.returncode != 0
    assert f"cannot resume from {checkpoints}" in result.stderr and "trainer.resume=false" in result.stderr
    assert (checkpoints / "best_mean.pth").read_bytes() == best, "the stage's results are untouched"
    ok(job(copy_of, output_root, "trainer.resume=false"))  # the deliberate restart
    assert (checkpoints / "last.pth").is_file()
    aside = list((copy_of / "stage1").glob("replaced-*/checkpoints/best_mean.pth"))
    assert len(aside) == 1 and aside[0].read_bytes() == best, "the earlier results are moved aside, not mixed in"
    assert list(aside[0].parents[1].glob("tensorboard/events.out.tfevents.*")), "the earlier curves too"
    curves = EventAccumulator(str(copy_of / "stage1" / "tensorboard"))
    curves.Reload()
    assert [e.step for e in curves.Scalars("val/auroc_mean")] == [1, 2], "one training's curve, not two"


def test_a_deleted_selected_best_is_written_again_from_its_epochs_full_state(copy_of, reference, output_root):
    """The rerun promised to finish the stage again, then failed on every try with a traceback
    (FileNotFoundError), though epoch_002.pth held the best epoch's weights."""
    best = copy_of / "stage1" / "checkpoints" / "best_mean.pth"
    best.unlink()
    result = ok(job(copy_of, output_root))
    assert "stage1: best_mean.pth written again from epoch_002.pth" in result.stdout + result.stderr
    assert best.read_bytes() == (reference / "stage1" / "checkpoints" / "best_mean.pth").read_bytes()
    assert not list((copy_of / "stage2").glob("replaced-*")), "stage 2 started from these very bytes: kept"
    assert final_metrics(copy_of) == final_metrics(reference)


def test_a_deleted_best_whose_epoch_no_full_state_holds_is_one_line(tmp_path, output_root):
    """keep_last=1 keeps epoch 2's state only; the learning rate too small to change a weight keeps
    the bests at epoch 1 (a later epoch must beat them)."""
    run_dir = tmp_path / "run"
    settings = ["stage=stage1", "trainer.checkpoint.keep_last=1", "phases.stage1.lr=1e-12"]
    ok(job(run_dir, output_root, *settings))
    best = run_dir / "stage1" / "checkpoints" / "best_mean.pth"
    assert load_checkpoint(best, mmap=True)["epoch"] == 1
    best.unlink()
    result = job(run_dir, output_root, *settings)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"mdfnet_hydra.train: error: checkpoint not found: {best}. It is stage1's selected checkpoint (best_mean), "
        "and no full state of its epoch 1 is left to write it again from; set trainer.resume=false to train the "
        "stage again"
    )


@pytest.mark.slow  # about 55 s: two jobs and a restart
def test_a_restarted_job_resumes_though_it_was_started_with_resume_false(copy_of, reference, output_root):
    """`trainer.resume=false` restarts a stage once per job: the job's SLURM requeue (or torchrun's
    restart of its workers) continues it instead of moving its progress aside again; a new job
    that inherited SLURM_RESTART_COUNT from the shell that submitted it (sbatch passes it on) is
    not a restart, and restarts the stage as asked."""

    def stopped_before_stage2_finished() -> None:
        for path in (copy_of / "stage2" / "metrics.json", copy_of / "metrics.json"):
            path.unlink()

    def replaced() -> list[Path]:
        return sorted((copy_of / "stage2").glob("replaced-*"))

    stopped_before_stage2_finished()
    ok(job(copy_of, output_root, "trainer.resume=false", env_extra={"SLURM_JOB_ID": "111"}))
    assert len(replaced()) == 1
    stopped_before_stage2_finished()
    requeued = {"SLURM_JOB_ID": "111", "SLURM_RESTART_COUNT": "1"}
    result = ok(job(copy_of, output_root, "trainer.resume=false", env_extra=requeued))
    log = result.stdout + result.stderr
    assert "stage2: trainer.resume=false restarts a job once, not at its SLURM requeue 1: resuming" in log
    assert "stage1: trainer.resume=false restarts an unfinished stage only; this one is complete and kept" in log
    assert len(replaced()) == 1, "its own progress is not moved aside again"
    assert final_metrics(copy_of) == final_metrics(reference)
    stopped_before_stage2_finished()
    inherited = {"SLURM_JOB_ID": "222", "SLURM_RESTART_COUNT": "1"}
    result = ok(job(copy_of, output_root, "trainer.resume=false", env_extra=inherited))
    assert "resuming" not in result.stdout + result.stderr and len(replaced()) == 2
    assert final_metrics(copy_of) == final_metrics(reference)
    # inside one SLURM allocation, a torchrun restart of another launch (another run id) is a new job
    stopped_before_stage2_finished()
    torchrun = {"SLURM_JOB_ID": "222", "TORCHELASTIC_RUN_ID": "b", "TORCHELASTIC_RESTART_COUNT": "1"}
    result = ok(job(copy_of, output_root, "trainer.resume=false", env_extra=torchrun))
    assert "resuming" not in result.stdout + result.stderr and len(replaced()) == 3
    stopped_before_stage2_finished()
    result = ok(
        job(copy_of, output_root, "trainer.resume=false", env_extra={**torchrun, "TORCHELASTIC_RESTART_COUNT": "2"})
    )
    assert "not at its torchrun restart 2: resuming" in result.stdout + result.stderr and len(replaced()) == 3


def test_temporaries_of_killed_writers_are_removed(copy_of, reference, output_root):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [
        copy_of / "stage1" / "checkpoints" / f".last.pth.tmp-{host}-{dead.pid}",
        copy_of / "stage2" / f".metrics.json.tmp-{dead.pid}",
    ]
    other_host = copy_of / "stage1" / f".metrics.json.tmp-othernode-{os.getpid()}"
    old_other_host = copy_of / "stage2" / f".metrics.json.tmp-othernode-{os.getpid()}"
    for path in [*stale, other_host, old_other_host]:
        path.write_bytes(b"half a file")
    os.utime(old_other_host, (time.time() - 7200, time.time() - 7200))
    ok(job(copy_of, output_root))
    assert not any(path.exists() for path in stale) and not old_other_host.exists()
    assert other_host.exists(), "another node's writer may still be live for an hour"


def test_a_stage_trained_from_an_older_stage1_checkpoint_is_trained_again(copy_of, output_root):
    best = copy_of / "stage1" / "checkpoints" / "best_mean.pth"
    state = load_checkpoint(best)
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name] + 1.0  # stage 1's best is not what stage 2 started from
    torch.save(state, best)
    summary = json.loads((copy_of / "metrics.json").read_text())
    result = ok(job(copy_of, output_root))
    assert "stage2 started from another checkpoint than this job's" in result.stdout + result.stderr
    assert list((copy_of / "stage2").glob("replaced-*/metrics.json")), "the out-of-date results are kept aside"
    retrained = json.loads((copy_of / "stage2" / "metrics.json").read_text())
    assert retrained["started_from_sha256"] != summary["stages"]["stage2"]["started_from_sha256"]


def test_a_rerun_with_another_training_config_is_refused_naming_the_keys(copy_of, output_root):
    record = {p.name: p.read_bytes() for p in (copy_of / ".hydra").iterdir()}
    summary = (copy_of / "metrics.json").read_bytes()
    result = job(copy_of, output_root, "loss=bce", "seed=7")
    assert result.returncode != 0
    message = result.stderr
    assert f"{copy_of} holds results of another training config" in message
    assert "loss.bce_weight (0.7 recorded, 1.0 now)" in message and "seed (42 recorded, 7 now)" in message
    assert {p.name: p.read_bytes() for p in (copy_of / ".hydra").iterdir()} == record, (
        ".hydra/ still describes the results"
    )
    assert (copy_of / "metrics.json").read_bytes() == summary
    # what cannot change results may differ: a longer time budget, other loader settings
    ok(
        job(
            copy_of,
            output_root,
            "trainer.max_time=2h",
            "data.num_workers=0",
            "data.feature_cache_on_device=false",
            "trainer.log_every_n_steps=5",
            "data.verify_images=false",
            "trainer.checkpoint.keep_last=5",
            "trainer.batch_size=8",
            "trainer.grad_accum=4",
        )
    )


def test_a_job_that_left_no_results_does_not_bind_its_directory(tmp_path, output_root):
    run_dir = tmp_path / "run"
    failed = job(run_dir, output_root, "trainer.batch_size=100000")  # fails before any result: batch too large
    assert failed.returncode != 0 and "lower trainer.batch_size" in failed.stderr
    ok(job(run_dir, output_root))  # the corrected command, same directory


def test_a_second_job_in_a_busy_directory_is_refused_and_leaves_its_record(copy_of, output_root):
    record = {p.name: p.read_bytes() for p in (copy_of / ".hydra").iterdir()}
    with (copy_of / ".mdfnet" / "lock").open("a+") as held:  # a job that runs there now
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write("pid 12345 on node7 since 2026-11-26 07:00:00\n")
        held.flush()
        result = job(copy_of, output_root, "seed=7")
    assert result.returncode != 0
    assert f"another job is running in {copy_of} (pid 12345 on node7 since 2026-11-26 07:00:00)" in result.stderr
    assert {p.name: p.read_bytes() for p in (copy_of / ".hydra").iterdir()} == record


def test_torchrun_workers_all_stop_when_the_directory_is_refused(copy_of, output_root):
    """Rank 0 claims the directory; the other rank learns the refusal instead of waiting for it."""
    result = _torchrun(copy_of, output_root, "seed=7")
    assert result.returncode != 0
    assert result.stderr.count("holds results of another training config") >= 2, result.stderr[-3000:]


def test_a_crafted_pickle_checkpoint_never_executes_and_the_failure_reaches_the_run_log(tmp_path, output_root):
    marker = tmp_path / "executed"
    crafted = tmp_path / "crafted.pth"
    torch.save({"model": _Exploit(marker)}, crafted)
    run_dir = tmp_path / "run"
    result = job(run_dir, output_root, "stage=stage2", f"stage.init_from={crafted}")
    assert result.returncode != 0 and not marker.exists()
    assert f"checkpoint {crafted} is not a plain-tensor checkpoint" in result.stderr
    log = (run_dir / "logs" / "train.log").read_text()
    assert "job failed: DamagedFileError" in log and "Traceback" in log


def test_a_config_from_elsewhere_cannot_run_arbitrary_callables(tmp_path, output_root):
    marker = tmp_path / "created-by-config"
    shared = tmp_path / "shared_conf" / "experiment"
    shared.mkdir(parents=True)
    (shared / "tuned.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    evil:\n      _target_: builtins.open\n"
        f"      file: {marker}\n      mode: w\n"
    )
    result = job(tmp_path / "run", output_root, "--config-dir", str(shared.parent), "experiment=tuned")
    assert result.returncode != 0 and not marker.exists()
    assert "Target 'builtins.open' is not in the Hydra execution whitelist" in result.stderr
    assert not (tmp_path / "run" / "stage1").exists(), "refused before any work"


def test_a_callable_is_allowed_deliberately_from_the_shell_not_from_a_config(tmp_path, output_root):
    callback = "+hydra.callbacks.extra._target_=hydra.experimental.callbacks.LogJobReturnCallback"
    refused = job(tmp_path / "refused", output_root, "stage=stage1", callback)
    assert refused.returncode != 0 and "is not in the Hydra execution whitelist" in refused.stderr
    allowed = job(
        tmp_path / "allowed",
        output_root,
        "stage=stage1",
        callback,
        env_extra={"MDFNET_ALLOW_TARGETS": "hydra.experimental.callbacks.LogJobReturnCallback"},
    )
    ok(allowed)
    assert (tmp_path / "allowed" / "metrics.json").is_file()


def test_two_jobs_in_one_directory_run_one_at_a_time(tmp_path, output_root):
    run_dir = tmp_path / "run"
    long_job = _cli(run_dir, output_root) + ["phases.stage1.epochs=50"]  # holds the directory for a while
    first = subprocess.Popen(
        long_job,
        cwd=str(Path(__file__).parents[1]),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        lock = run_dir / ".mdfnet" / "lock"
        deadline = time.time() + 120
        while not (lock.is_file() and f"pid {first.pid} " in lock.read_text()) and time.time() < deadline:
            assert first.poll() is None, "the first job ended early"
            time.sleep(0.1)
        second = subprocess.run(
            long_job, cwd=str(Path(__file__).parents[1]), env=_env(), capture_output=True, text=True, timeout=300
        )
        assert first.poll() is None, "the first job was still running when the second was refused"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode != 0
    assert f"another job is running in {run_dir} (pid {first.pid} on " in second.stderr


@pytest.mark.slow
def test_resuming_on_another_number_of_workers_is_refused_naming_the_batch(copy_of, output_root):
    for done in (copy_of / "stage1" / "metrics.json", copy_of / "metrics.json"):
        done.unlink()  # stage 1 was interrupted after its last epoch, before its result
    shutil.rmtree(copy_of / "stage2")
    # the launcher's config says 2 workers: the run record sees the effective batch change
    result = job(copy_of, output_root, "trainer.nproc_per_node=2", "trainer.max_restarts=0", timeout=300)
    assert result.returncode != 0 and "effective batch" in result.stderr and "(32 recorded, 64 now)" in result.stderr
    # torchrun's 2 workers are not in the config: the resumed training state sees it
    result = _torchrun(copy_of, output_root)
    assert result.returncode != 0
    assert "was trained with effective batch 32" in result.stderr and "trainer.global_batch_size" in result.stderr
    ok(_torchrun(copy_of, output_root, "trainer.global_batch_size=16"))


@pytest.mark.slow
def test_a_job_killed_while_holding_its_directory_leaves_no_stuck_lock(tmp_path, reference, output_root):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(run_dir, output_root),
        cwd=str(Path(__file__).parents[1]),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = run_dir / "stage1" / "checkpoints" / "last.pth"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ok(job(run_dir, output_root))
    assert final_metrics(run_dir) == final_metrics(reference)


LOCK_HOLDER = """
import sys, time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mdfnet_hydra.data.cache_store import exclusive
from mdfnet_hydra.run_directory import acquire_lock


class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        time.sleep(0.05)
        return i


run_dir, cache_lock = Path(sys.argv[1]), Path(sys.argv[2])
handle = acquire_lock(run_dir)
with exclusive(cache_lock):
    # forked workers, as the trainer's and the cache build's loaders fork them on Linux
    batches = iter(DataLoader(Slow(), batch_size=2, num_workers=2, multiprocessing_context="fork"))
    next(batches)
    print("ready", flush=True)
    time.sleep(300)
"""


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_killed_jobs_locks_are_free_at_once_though_its_dataloader_workers_live_on(tmp_path):
    """SIGKILL of a job holding its run directory and a cache build's lock while its forked
    DataLoader workers still run (they notice a dead parent only seconds later): an immediate rerun
    gets both locks; the workers did not inherit them."""
    from mdfnet_hydra.data.cache_store import exclusive
    from mdfnet_hydra.files import release_lock
    from mdfnet_hydra.run_directory import acquire_lock

    run_dir, cache_lock = tmp_path / "run", tmp_path / "cache" / "key.lock"
    workers: list[int] = []
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run_dir), str(cache_lock)],
        cwd=str(Path(__file__).parents[1]),
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        handle = acquire_lock(run_dir)  # no waiting: a held lock raises RunDirectoryBusy
        assert handle is not None
        with open(cache_lock, "a+") as cache:
            fcntl.flock(cache, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if a worker held it
        assert any(_alive(pid) for pid in workers), "the workers had already gone: nothing was tested"
        release_lock(handle)
        with exclusive(cache_lock):
            pass
    finally:
        proc.kill()
        for pid in workers:  # (re-parented once the job died: found by the pids taken above)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small disk needs root")
def test_a_full_disk_is_reported_as_such_and_the_rerun_completes(tmp_path, reference, output_root):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not let a test mount a tmpfs")
    try:
        run_dir = disk / "run"
        result = job(run_dir, output_root)
        assert result.returncode != 0
        assert "no space left on device: writing " + str(run_dir) in result.stderr, result.stderr[-3000:]
        assert "inline_container" not in result.stderr.splitlines()[-1]
        assert not list(run_dir.rglob(".*.tmp-*")), "a failed write leaves no temporary behind"
        subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
        ok(job(run_dir, output_root))
        assert final_metrics(run_dir) == final_metrics(reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _torchrun(run_dir: Path, output_root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "mdfnet_hydra.train",
            *JOB,
            f"paths.root={output_root}",
            f"hydra.run.dir={run_dir}",
            "evaluation.on_finish=false",
            *extra,
        ],
        cwd=str(Path(__file__).parents[1]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _cli(run_dir: Path, output_root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mdfnet_hydra.train",
        *JOB,
        f"paths.root={output_root}",
        f"hydra.run.dir={run_dir}",
        "evaluation.on_finish=false",
    ]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


class _Exploit:
    """Unpickling this would create `marker`: proof that a loader ran code from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_scalars_a_killed_job_logged_past_its_checkpoint_show_once_after_the_resume(tmp_path):
    """A job killed in its first epoch, started again from nothing, then killed in epoch 2
    (checkpoint after step 5) having logged steps 6-8; the resumed job logs 6-10 again: TensorBoard's
    own reader shows each step once, with the values of the job that went on."""
    from mdfnet_hydra.tracking import Tracker

    def job(resumed_step: int, steps: range, value: float, epochs: dict[int, float]) -> None:
        tracker = Tracker(tmp_path, enabled=True)
        tracker.open_events(resumed_step)
        for step in steps:
            tracker.scalar("batch/loss", value, step)
        for epoch, auroc in epochs.items():
            tracker.scalar("val/auroc_mean", auroc, epoch)
        tracker.flush()  # what a kill leaves on disk
        tracker.close()

    job(0, range(1, 4), 0.5, {})  # killed in its first epoch, before any checkpoint
    job(0, range(1, 9), 1.0, {1: 0.6})  # started again; killed in epoch 2 (checkpoint after step 5)
    job(5, range(6, 11), 2.0, {2: 0.7})
    curves = EventAccumulator(str(tmp_path / "tensorboard"))
    curves.Reload()
    assert [(e.step, e.value) for e in curves.Scalars("batch/loss")] == [
        (s, 1.0 if s <= 5 else 2.0) for s in range(1, 11)
    ]
    assert [(e.step, round(e.value, 6)) for e in curves.Scalars("val/auroc_mean")] == [(1, 0.6), (2, 0.7)]


# --- a rerun after trainer.max_time or trainer.eval_test=false (in-process: three jobs each) -----------

STAGE1 = ["debug=fast", "modality=clinical", "stage=stage1", "phases.stage1.epochs=2"]  # 2 steps per epoch


@pytest.fixture(scope="module")
def stage1_reference(tmp_path_factory, output_root) -> dict:
    """The result of a stage-1 job that had no time limit and evaluated the test split."""
    from mdfnet_hydra.pipeline import run

    return run(make_cfg(STAGE1, tmp_path_factory.mktemp("faults") / "stage1", output_root))["stages"]["stage1"]


def test_an_epoch_cut_by_the_time_budget_is_not_counted_and_a_rerun_with_more_time_trains_on(
    tmp_path, output_root, stage1_reference
):
    from mdfnet_hydra.pipeline import run

    run_dir, log = tmp_path / "run", tmp_path / "run" / "logs" / "train.log"
    # the budget runs out at epoch 1's first step of 2: no epoch is counted, no state of a half epoch saved
    stage = run(make_cfg([*STAGE1, "trainer.max_time=0.01s"], run_dir, output_root))["stages"]["stage1"]
    assert stage["stopped_by"] == "max_time" and stage["epochs_run"] == 0 and stage["selected_checkpoint"] is None
    assert {k: stage["unfinished_epoch"][k] for k in ("epoch", "steps_done", "steps")} == {
        "epoch": 1,
        "steps_done": 1,
        "steps": 2,
    }
    assert not (run_dir / "stage1" / "checkpoints" / "last.pth").exists()
    assert "epoch 1 stopped after 1 of 2 steps: those steps are discarded" in log.read_text()
    # the same budget again: kept as it is, and the log says how to go on
    again = run(make_cfg([*STAGE1, "trainer.max_time=0.01s"], run_dir, output_root))["stages"]["stage1"]
    assert again == stage
    assert "gives it no more time: kept as it is. Rerun with a larger trainer.max_time" in log.read_text()
    # no limit: it trains its epochs, to what a job without a limit trained
    done = run(make_cfg(STAGE1, run_dir, output_root))["stages"]["stage1"]
    assert "stopped by trainer.max_time (0.01s) after 0 of 2 epochs in an earlier job: continuing it" in log.read_text()
    assert done["stopped_by"] is None and done["epochs_run"] == 2 and done["unfinished_epoch"] is None
    assert done["val"] == stage1_reference["val"] and done["test"] == stage1_reference["test"]
    # while it trained on, the earlier result was not the stage's: a continuation that died is resumed
    assert json.loads((run_dir / "stage1" / "metrics.before-continuing.json").read_text()) == stage


def test_a_rerun_with_eval_test_evaluates_the_test_split_of_a_stage_finished_without_it(
    tmp_path, output_root, stage1_reference
):
    from mdfnet_hydra.pipeline import run

    run_dir = tmp_path / "run"
    first = run(make_cfg([*STAGE1, "trainer.eval_test=false"], run_dir, output_root))["stages"]["stage1"]
    test_file = run_dir / "stage1" / "predictions" / "test.npz"
    assert first["test"] is None and not test_file.exists()
    checkpoints = {p.name: p.read_bytes() for p in (run_dir / "stage1" / "checkpoints").iterdir()}
    summary = run(make_cfg(STAGE1, run_dir, output_root))
    second = summary["stages"]["stage1"]
    assert "its test split was not evaluated" in (run_dir / "logs" / "train.log").read_text()
    assert second["test"] == stage1_reference["test"] and test_file.is_file()
    assert {k: v for k, v in second.items() if k != "test"} == {k: v for k, v in first.items() if k != "test"}
    assert {p.name: p.read_bytes() for p in (run_dir / "stage1" / "checkpoints").iterdir()} == checkpoints
    assert json.loads((run_dir / "metrics.json").read_text())["stages"]["stage1"]["test"] == second["test"]


def _text_job(run_dir: Path, output_root: Path, encoder: Path, *extra: str) -> subprocess.CompletedProcess:
    """Stage 1 of the text-only model on a tiny local transformers encoder (a pretrained source)."""
    return run_cli(
        "debug=fast",
        "stage=stage1",
        "modality=text",
        "model/text=clinical_modernbert",
        f"model.text.name_or_path={encoder}",
        "model.text.max_length=64",
        *SMALL_DATA,
        f"paths.root={output_root}",
        f"hydra.run.dir={run_dir}",
        *extra,
    )


def _replace_weights_in_place(encoder: Path) -> None:
    """What `cp other/model.safetensors <dir>/` does: other weights under the same name and config."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(encoder / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name] + 0.5
    save_file(state, str(encoder / "model.safetensors"), metadata={"format": "pt"})


def test_a_complete_stage_of_an_encoder_directory_changed_since_is_refused_not_kept(tmp_path, output_root):
    encoder, run_dir = tmp_path / "bert", tmp_path / "run"
    save_hf_encoder(encoder, "bert")
    ok(_text_job(run_dir, output_root, encoder))
    again = ok(_text_job(run_dir, output_root, encoder))  # the directory as it was: complete, kept
    assert "stage1: already complete" in again.stdout + again.stderr
    results = (run_dir / "stage1" / "metrics.json").read_bytes()
    _replace_weights_in_place(encoder)
    refused = _text_job(run_dir, output_root, encoder)
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("mdfnet_hydra.train: error: stage1 in ") and "is complete" in last
    assert f"model.text.name_or_path={encoder}" in last and "hydra.run.dir=" in last
    assert "already complete" not in refused.stdout + refused.stderr
    assert (run_dir / "stage1" / "metrics.json").read_bytes() == results
    assert json.loads(results)["encoder_sha256"]["text"], "what the refusal compared with"


def test_resuming_a_stage_after_its_encoder_directory_changed_is_refused(tmp_path, output_root):
    encoder, run_dir = tmp_path / "bert", tmp_path / "run"
    save_hf_encoder(encoder, "bert")
    ok(_text_job(run_dir, output_root, encoder, "phases.stage1.epochs=2"))
    stage1 = run_dir / "stage1"
    shutil.copyfile(stage1 / "checkpoints" / "epoch_001.pth", stage1 / "checkpoints" / "last.pth")
    for done in (stage1 / "metrics.json", run_dir / "metrics.json"):
        done.unlink()  # the job was stopped during the second epoch
    old = load_checkpoint(stage1 / "checkpoints" / "last.pth").get("encoder_sha256")
    _replace_weights_in_place(encoder)
    refused = _text_job(run_dir, output_root, encoder, "phases.stage1.epochs=2")
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mdfnet_hydra.train: error: stage1: {stage1 / 'checkpoints' / 'last.pth'} was trained")
    assert f"model.text.name_or_path={encoder}" in last and "trainer.resume=false" in last
    assert load_checkpoint(stage1 / "checkpoints" / "last.pth")["epoch"] == 1, "nothing trained on"
    ok(_text_job(run_dir, output_root, encoder, "phases.stage1.epochs=2", "trainer.resume=false"))  # the fix it names
    retrained = json.loads((stage1 / "metrics.json").read_text())
    assert retrained["epochs_run"] == 2 and retrained["encoder_sha256"]["text"] != old["text"]


def test_a_stage_started_from_a_checkpoint_counts_its_encoders_config_and_tokenizer_not_weights(tmp_path, output_root):
    """Stage 2 from `stage.init_from` takes its encoder weights from that checkpoint: new weights in
    the directory leave its result this job's (it was refused); a changed tokenizer does not."""
    encoder, first, second = tmp_path / "bert", tmp_path / "first", tmp_path / "second"
    save_hf_encoder(encoder, "bert")
    ok(_text_job(first, output_root, encoder))
    stage2 = ("stage=stage2", f"stage.init_from={first / 'stage1' / 'checkpoints' / 'best_mean.pth'}")
    ok(_text_job(second, output_root, encoder, *stage2))
    recorded = json.loads((second / "stage2" / "metrics.json").read_text())["encoder_sha256"]["text"]
    assert set(recorded) == {"config", "tokenizer", "weights"}
    _replace_weights_in_place(encoder)
    again = ok(_text_job(second, output_root, encoder, *stage2))
    assert "stage2: already complete" in again.stdout + again.stderr
    tokenizer = json.loads((encoder / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (encoder / "tokenizer.json").write_text(json.dumps(tokenizer))
    refused = _text_job(second, output_root, encoder, *stage2)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1 and f"model.text.name_or_path={encoder} (tokenizer changed)" in last
