"""Data-parallel training on CPU with gloo, through the real entry point, torchrun and the elastic agent."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, run_cli
from mdfnet_hydra.checkpoint import load_checkpoint
from mdfnet_hydra.distributed import WorkerEnv, config_differences, worker_env
from mdfnet_hydra.labels import CHEXPERT_LABELS

SMALL = ("data.synthetic.num_samples=300", "data.synthetic.image_size=32")
# no dropout, so one worker and two workers draw no different random numbers
NO_DROPOUT = ("model.fusion.dropout=0", "model.head.dropout1=0", "model.head.dropout2=0", "model.clinical.dropout=0")
EXPECTED_STAGE_FILES = {"config.yaml", "logs", "tensorboard", "checkpoints", "metrics.json", "predictions"}


def only_run_dir(root: Path) -> Path:
    runs = [p for p in (root / "runs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def assert_complete_run(run_dir: Path) -> None:
    assert {"stage1", "stage2", ".hydra", "logs", "metrics.json"} <= {p.name for p in run_dir.iterdir()}
    for stage in ("stage1", "stage2"):
        assert EXPECTED_STAGE_FILES <= {p.name for p in (run_dir / stage).iterdir()}
        assert (run_dir / stage / "checkpoints" / "best_mean.pth").is_file()


# two stages of 2 epochs, 6 batches each, a global batch of 16 over however many workers
TWO_SHORT_STAGES = (
    "debug=fast",
    *SMALL,
    *NO_DROPOUT,
    "trainer.global_batch_size=16",
    "data.small_sample=null",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=null",
    "phases.stage1.epochs=2",
    "phases.stage2.epochs=2",
)


@pytest.fixture(scope="module")
def one_and_two_workers(tmp_path_factory):
    """The same job with a global batch of 16: one process, and two gloo workers of 8."""
    roots = {}
    for workers in (1, 2):
        root = tmp_path_factory.mktemp(f"workers{workers}")
        result = run_cli(*TWO_SHORT_STAGES, f"paths.root={root}", f"trainer.nproc_per_node={workers}")
        assert result.returncode == 0, result.stderr[-4000:]
        roots[workers] = (only_run_dir(root), result)
    return roots


def assert_adam_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal to 1e-5 but for isolated elements within a tenth of a learning-rate step (1e-4).

    Two ranks sum a batch's gradient in another order than one process (float noise ~1e-7), and
    AdamW divides by sqrt(v): an element whose gradient is near zero turns that noise into a
    visible update. Seen with torch 2.14.1: one element of 10,240 off by 2.2e-5, the rest within 1e-6.
    """
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), name
        return
    diff = (actual - expected).abs()
    strict = 1e-5 + 1e-4 * expected.abs()
    assert diff.max().item() <= 1e-4, f"{name}: max difference {diff.max().item():.2e}"
    assert (diff > strict).float().mean().item() <= 1e-3, (
        f"{name}: {(diff > strict).sum().item()} of {diff.numel()} elements beyond 1e-5"
    )


def assert_same_last_weights(expected: Path, actual: Path, stage: str) -> None:
    """Both runs' last checkpoints of `stage` after its 2 epochs, weight by weight (assert_adam_close)."""
    a = load_checkpoint(expected / stage / "checkpoints" / "last.pth")
    b = load_checkpoint(actual / stage / "checkpoints" / "last.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert_adam_close(b["model"][key], a["model"][key], f"{actual.name} {stage} {key}")


def test_two_workers_match_one_worker(one_and_two_workers):
    (one, _), (two, _) = one_and_two_workers[1], one_and_two_workers[2]
    for stage in ("stage1", "stage2"):
        assert_same_last_weights(one, two, stage)
        ma = json.loads((one / stage / "metrics.json").read_text())["val"]
        mb = json.loads((two / stage / "metrics.json").read_text())["val"]
        assert mb["loss"] == pytest.approx(ma["loss"], abs=1e-5)
        for name in CHEXPERT_LABELS:
            if ma["auroc"][name] is None:
                assert mb["auroc"][name] is None
            else:
                assert mb["auroc"][name] == pytest.approx(ma["auroc"][name], abs=1e-4)
        # metrics cover the whole validation split, not rank 0's shard
        assert sum(mb["positives"].values()) + sum(mb["negatives"].values()) == sum(ma["positives"].values()) + sum(
            ma["negatives"].values()
        )
        # the logged training loss too: every rank's batches (it was rank 0's half), per epoch and per step
        logs = [(run / stage / "logs" / "train.log").read_text() for run in (one, two)]
        for pattern in (r"train loss ([0-9.]+)", r"step \d+/\d+ \| loss ([0-9.]+)"):
            single, double = ([float(v) for v in re.findall(pattern, log)] for log in logs)
            assert single and len(single) == len(double), pattern
            assert double == pytest.approx(single, abs=2e-4), pattern


@pytest.mark.slow  # two ranks compile each stage's step with inductor: about a minute on 2 cores
def test_two_compiled_workers_train_like_two_eager_workers(one_and_two_workers, tmp_path):
    """trainer.compile=true under DDP (gloo, 2 ranks, accumulation 2 with no_sync, both stages,
    reports padded to buckets, the loss compiled after the model): the eager DDP run's weights,
    every epoch line counting the graphs the step compiled, the buckets' graph limit never hit."""
    result = run_cli(
        *TWO_SHORT_STAGES,
        f"paths.root={tmp_path}",
        "trainer.nproc_per_node=2",
        "trainer.compile=true",
        "model.text.length_buckets=[64,128]",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled, (eager, _) = only_run_dir(tmp_path), one_and_two_workers[2]
    for stage in ("stage1", "stage2"):
        assert_same_last_weights(eager, compiled, stage)
        log = (compiled / stage / "logs" / "train.log").read_text()
        notes = re.findall(rf"{stage} epoch \d/2 \|.*; compiled graphs (\d+), graph breaks (\d+)", log)
        # the phase's counts after each epoch: the model's graph and the loss's, all in epoch 1
        assert len(notes) == 2 and notes[0] == notes[1] and notes[0][0] == "2", log[-3000:]
    plan = "training steps through torch.compile (mode default, static shapes, at most 2 graphs"
    job_log = (compiled / "logs" / "train.log").read_text()
    assert job_log.count(plan) == 2 and "the model and the loss (DDP's forward between them eager;" in job_log


def test_entry_point_with_two_workers_writes_one_complete_run(one_and_two_workers):
    run_dir, result = one_and_two_workers[2]
    assert_complete_run(run_dir)
    head = (run_dir / "logs" / "train.log").read_text().splitlines()[:4]
    assert any("world size 2 (backend gloo" in line and "device cpu" in line for line in head), head
    assert any("effective batch 32 = 8 per device x 2 worker(s) x 2 accumulation" in line for line in head), head
    stage_log = (run_dir / "stage1" / "logs" / "train.log").read_text()
    assert stage_log.count("stage1 epoch 1/2 |") == 1, "only rank 0 logs"
    assert "launching 2 worker(s) per node" in result.stdout + result.stderr


def test_torchrun_gives_the_same_single_run_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "mdfnet_hydra.train",
            "debug=fast",
            *SMALL,
            f"paths.root={tmp_path}",
            "modality=vision_clinical",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = only_run_dir(tmp_path)
    assert_complete_run(run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["stages"]["stage2"]["effective_batch_size"] == 16 * 2 * 2
    assert (run_dir / "logs" / "train.log").read_text().count("world size 2") == 1


def _worker_pids(launcher_pid: int) -> list[int]:
    """The elastic agent's spawned workers: children of the launcher running multiprocessing's spawn_main."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and b"spawn_main" in cmdline:
            pids.append(int(proc.name))
    return sorted(pids)


@pytest.mark.slow  # tens of seconds; CI's slow suite runs it
def test_killed_worker_is_restarted_and_training_resumes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    epochs = 8
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mdfnet_hydra.train",
            "debug=fast",
            *SMALL,
            f"paths.root={tmp_path}",
            "stage=stage1",
            "modality=vision_text",
            "trainer.nproc_per_node=2",
            "trainer.max_restarts=1",
            "trainer.resume=false",  # the job's start: the restart still resumes
            f"phases.stage1.epochs={epochs}",
            "trainer.limit_train_batches=null",
            "data.small_sample=null",
            "trainer.global_batch_size=8",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = tmp_path / "run" / "stage1" / "checkpoints" / "last.pth"
    killed_after = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            epoch = load_checkpoint(last)["epoch"]
            if 2 <= epoch < epochs - 2:
                victims = _worker_pids(proc.pid)
                if len(victims) == 2:
                    os.kill(victims[-1], signal.SIGKILL)
                    killed_after = epoch
                    break
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=600)
    assert killed_after is not None, "never caught the job mid-training:\n" + output[-3000:]
    assert proc.returncode == 0, output[-4000:]
    log = (tmp_path / "run" / "stage1" / "logs" / "train.log").read_text()
    resumed = [int(m) for m in re.findall(r"stage1: resumed from .*last\.pth after epoch (\d+)", log)]
    assert resumed and resumed[0] >= killed_after, log[-3000:]
    metrics = json.loads((tmp_path / "run" / "stage1" / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs
    assert log.count(f"stage1 epoch 1/{epochs} |") == 1, "epochs before the kill are not trained again"
    assert "trainer.resume=false restarts a job once, not at its torchrun restart 1: resuming" in log
    assert not list((tmp_path / "run" / "stage1").glob("replaced-*"))
    curves = EventAccumulator(str(tmp_path / "run" / "stage1" / "tensorboard"))
    curves.Reload()
    steps = [e.step for e in curves.Scalars("batch/loss")]
    assert steps == sorted(set(steps)), "steps logged past the checkpoint, then again after the restart, show once"
    assert {e.step for e in curves.Scalars("val/auroc_mean")} == set(range(1, epochs + 1))


def test_worker_environment_detection(monkeypatch):
    assert worker_env({}) is None
    assert worker_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == WorkerEnv(3, 1, 8, "torchrun")
    slurm_per_gpu = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert worker_env(slurm_per_gpu) == WorkerEnv(5, 1, 8, "slurm")
    # one task per node: the task launches the node's workers itself
    assert worker_env({**slurm_per_gpu, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, nproc_per_node=4) is None
    assert worker_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None


def test_slurm_one_task_per_node_topology(monkeypatch):
    from mdfnet_hydra.launch import slurm_topology

    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NUM_NODES": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert slurm_topology(env) == (2, 1, f"gpu07:{20000 + 4242}", "slurm-4242")
    assert slurm_topology({**env, "SLURM_NTASKS": "8"}) is None  # one task per GPU instead


def test_frozen_encoders_stay_out_of_ddp_buckets(cfg_factory, monkeypatch):
    import torch.distributed as dist
    from test_model import build
    from torch.nn.parallel import DistributedDataParallel

    model, _, _ = build(cfg_factory())
    model.set_encoders_frozen(True)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29000 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        synced = DistributedDataParallel(model)._get_ddp_logging_data()["num_parameter_tensors"]
    finally:
        dist.destroy_process_group()
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert synced == trainable < len(list(model.parameters()))


@pytest.mark.slow  # tens of seconds; CI's slow suite runs it
def test_data_parallel_jobs_inside_a_multirun(tmp_path):
    """Each job launches two workers; the workers know they belong to a multirun, so the runs are
    evaluated once, by the sweep (the workers used to evaluate each job as well)."""
    result = run_cli(
        "--multirun",
        "modality=clinical,vision_clinical",
        "trainer.nproc_per_node=2",
        "debug=fast",
        *SMALL,
        f"paths.root={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "evaluation.n_bootstrap=100",
        "evaluation.figures=false",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for job, modalities in (("0", ["clinical"]), ("1", ["vision", "clinical"])):
        summary = json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())
        assert summary["stages"]["stage2"]["modalities"] == modalities
        assert summary["stages"]["stage2"]["effective_batch_size"] == 16 * 2 * 2
        assert (tmp_path / "sweep" / job / ".hydra" / "overrides.yaml").is_file()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("evaluation")) == ["sweep/evaluation"]
    with (tmp_path / "sweep" / "evaluation" / "results_summary.csv").open() as handle:
        assert len(list(handle)) == 1 + 4, "both stages of both jobs"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(tmp_path: Path, node1_extra: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    """One job on two "nodes" of this machine, as docs/distributed.md starts it: a launcher per
    node with its own command line (node 1's with `node1_extra` added), one worker each, one
    rendezvous and one shared run directory. (exit status, console) per node."""
    port = _free_port()
    common = (
        "debug=fast",
        *SMALL,
        f"paths.root={tmp_path}",
        "stage=stage1",
        "modality=vision_clinical",
        "evaluation.on_finish=false",
        "trainer.nproc_per_node=1",
        "trainer.nnodes=2",
        "trainer.max_restarts=0",
        f"trainer.rdzv_endpoint=127.0.0.1:{port}",
        f"trainer.rdzv_id=two-nodes-{port}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    consoles = [tmp_path / f"node{k}.out" for k in (0, 1)]
    procs = []
    for k, console in enumerate(consoles):
        args = (*common, f"trainer.node_rank={k}", *(node1_extra if k else ()))
        with console.open("w") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mdfnet_hydra.train", *args], cwd=REPO, env=env, stdout=out, stderr=out
                )
            )
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(code, console.read_text()) for code, console in zip(codes, consoles)]


@pytest.mark.slow  # two launchers and their workers on 2 cores: tens of seconds
def test_two_nodes_with_the_same_config_train_one_job(tmp_path):
    results = two_nodes(tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "waiting for 2 nodes at 127.0.0.1:" in results[0][1]
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert log.count("world size 2 (backend gloo") == 1, log[-3000:]
    assert (tmp_path / "run" / "stage1" / "checkpoints" / "best_mean.pth").is_file()


def test_two_nodes_started_with_different_overrides_both_fail_naming_the_keys(tmp_path):
    results = two_nodes(tmp_path, node1_extra=("phases.stage1.lr=0.01",))
    expected = (
        "node 1 (rank 1) was started with another config than node 0: phases.stage1.lr (0.001 on node 0, "
        "0.01 on node 1); start every node with the same overrides"
    )
    for node, (code, console) in enumerate(results):
        assert code != 0, f"node {node}:\n{console[-3000:]}"
        assert expected in console, f"node {node}:\n{console[-3000:]}"
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert f"job failed: RefusedOnEveryTry: {expected}" in log, log[-3000:]
    assert not (tmp_path / "run" / "stage1").exists(), "no work before the check"


# each rank: a gloo group of 2, a cache every rank sees, then one rank 1 does not see
CACHE_CHECK = """
import sys
from pathlib import Path

import torch.distributed as dist

from mdfnet_hydra.config import ConfigError
from mdfnet_hydra.data.feature_cache import SHARED_CACHE
from mdfnet_hydra.distributed import refuse_unseen

shared, local = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo", init_method="env://")
refuse_unseen(shared, "the feature cache", SHARED_CACHE)
print("shared: seen")
try:
    refuse_unseen(local, "the feature cache", SHARED_CACHE)
    print("local: seen")
except ConfigError as err:
    print(f"local: {err}")
dist.destroy_process_group()
"""


def test_a_cache_some_node_cannot_see_fails_every_rank_naming_it(tmp_path):
    """Node-local `paths.cache_dir` (the same path on each node, another disk): rank 0 built the
    cache in its directory, which does not exist for rank 1 ("node 1"). Two real gloo ranks; both
    must raise the same error instead of rank 1 failing alone with a FileNotFoundError."""
    shared = tmp_path / "cache" / "vision" / "abc"
    shared.mkdir(parents=True)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        local = shared if rank == 0 else tmp_path / "node1" / "cache" / "vision" / "abc"
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "GROUP_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CACHE_CHECK, str(shared), str(local)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    expected = (
        f"local: the feature cache {shared}, built by rank 0, is not visible on node 1 (rank 1): "
        "paths.cache_dir must be on a file system every node shares, or data.feature_cache=false"
    )
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank}:\n{output[-3000:]}"
        assert output.splitlines()[-2:] == ["shared: seen", expected], f"rank {rank}:\n{output[-3000:]}"


def test_config_differences_name_each_node_its_ranks_and_both_values():
    same = {"seed": 42, "phases.stage1.lr": 0.001}
    other = {"seed": 7, "phases.stage1.lr": 0.001, "extra": 1}
    assert config_differences([(0, same), (0, same), (1, same), (1, same)]) == ""
    message = config_differences([(0, same), (0, same), (1, other), (1, other), (2, same), (2, same)])
    assert message == (
        "node 1 (ranks 2-3) was started with another config than node 0: extra (not set on node 0, 1 on node 1), "
        "seed (42 on node 0, 7 on node 1); start every node with the same overrides (only trainer.node_rank differs)"
    )
    assert config_differences([(0, same), (0, other)]).startswith("rank 1 on node 0 was started with another config")


@pytest.mark.slow  # two workers on 2 cores: about 20 s
def test_a_jobs_warnings_are_said_once_by_two_workers(tmp_path):
    """A job-wide warning (here: stage 2 from an untrained fusion) is the same on every rank: the
    console shows it once at the start, not once per worker (the summary repeats it once)."""
    result = run_cli(
        "debug=fast",
        *SMALL,
        "modality=clinical",
        "stage=stage2",
        "phases.stage2.epochs=1",
        "trainer.nproc_per_node=2",
        "data.small_sample=null",
        "trainer.limit_train_batches=3",  # grad_accum 2: a window leaves one out
        "evaluation.on_finish=false",
        f"paths.root={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warning = "stage 2 starts from an untrained fusion and head"
    console = (result.stdout + result.stderr).splitlines()
    assert len([line for line in console if warning in line and "[WARNING]" in line]) == 1, console
    assert len([line for line in console if "stage2: trains on 2 of 3 batches per epoch" in line]) == 1, console
    assert len([line for line in console if line.startswith(f"WARNING: {warning}")]) == 1, "the summary's"
