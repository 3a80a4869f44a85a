"""Errors a person reads: what the entry points print and leave behind when the input is wrong or
the user presses Ctrl-C, run as a user runs them (real subprocesses)."""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SMALL_DATA, interrupted_cli, run_cli


def module(name: str, *args: str, cwd: Path = REPO, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", name, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})},
    )


def test_a_config_error_is_one_line_and_leaves_no_run_directory(tmp_path):
    result = run_cli("data=processed", f"paths.root={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "mdfnet_hydra.train: error: invalid configuration: data=processed needs data.root=<prepared dataset directory>"
    )
    assert not list((tmp_path / "runs").glob("*/*")), "the job never started: no run directory with only .hydra/"
    assert not list((tmp_path / "runs").glob("*")), "nor an empty date directory"
    full = run_cli("data=processed", f"paths.root={tmp_path}", env_extra={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr


def test_a_config_error_in_a_directory_another_job_holds_leaves_it_alone(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".mdfnet").mkdir(parents=True)
    with (run_dir / ".mdfnet" / "lock").open("a+") as held:  # a job that runs there now, before its first result
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cli("+trainer.foo=1", f"paths.root={tmp_path}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "mdfnet_hydra.train: error: invalid configuration: config does not match the "
        "schema: Key 'foo' not in 'TrainerConfig' (full_key: trainer.foo)"
    )
    assert (run_dir / ".mdfnet" / "lock").is_file() and (run_dir / ".hydra").is_dir()


def test_mistakes_found_once_the_job_knows_its_machine_are_one_line_too(tmp_path):
    """Asking for a GPU this machine lacks, or a batch larger than the training split."""
    no_gpu = run_cli("debug=fast", "modality=clinical", "trainer.device=cuda", f"paths.root={tmp_path}", *SMALL_DATA)
    assert no_gpu.returncode == 1 and "Traceback" not in no_gpu.stderr, no_gpu.stderr[-2000:]
    assert no_gpu.stderr.strip().startswith(
        "mdfnet_hydra.train: error: trainer.device=cuda but the machine has no CUDA"
    )
    # the end-of-run evaluation's device: refused before training, not after it
    eval_gpu = run_cli(
        "debug=fast", "modality=clinical", "evaluation.device=cuda", f"paths.root={tmp_path}", *SMALL_DATA
    )
    assert eval_gpu.returncode == 1 and "Traceback" not in eval_gpu.stderr, eval_gpu.stderr[-2000:]
    assert eval_gpu.stderr.strip() == (
        "mdfnet_hydra.train: error: evaluation.device=cuda but the machine has no CUDA "
        f"({len(os.sched_getaffinity(0))} CPUs, no CUDA); use evaluation.device=cpu"
    )
    assert not list(tmp_path.glob("runs/*/*/stage1")), "refused before stage 1"
    too_big = run_cli(
        "debug=fast",
        "modality=clinical",
        "stage=stage1",
        "trainer.batch_size=100000",
        f"paths.root={tmp_path}",
        *SMALL_DATA,
    )
    assert too_big.returncode == 1 and "Traceback" not in too_big.stderr, too_big.stderr[-2000:]
    assert "lower trainer.batch_size" in too_big.stderr.strip().splitlines()[-1]
    # found once the job had opened its log: the run directory stays, its log says why
    (run,) = tmp_path.glob("runs/*/*")
    assert "lower trainer.batch_size" in (run / "logs" / "train.log").read_text()


def test_a_global_batch_the_workers_cannot_split_is_refused_before_they_start(tmp_path):
    """It was found inside each worker, which the elastic agent restarted trainer.max_restarts
    times: about 80 s and 190 traceback lines for a one-line mistake."""
    for batch, nearest in ((10, "9 or 12"), (2, "3")):
        result = run_cli("trainer.nproc_per_node=3", f"trainer.global_batch_size={batch}", f"paths.root={tmp_path}")
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"mdfnet_hydra.train: error: invalid configuration: trainer.global_batch_size={batch} does not split "
            f"over 3 workers (world size): use a multiple of 3 ({nearest})"
        )
        assert not list((tmp_path / "runs").glob("*")), "no run directory"


@pytest.mark.slow  # two workers started to open the data, then twice restarted: about 60 s on 2 cores
def test_a_training_split_smaller_than_the_global_batch_names_that_batch(tmp_path):
    """2 workers with a global batch of 12 on a 10-sample split: the batch in force is 12 (6 per
    device x 2), set by trainer.global_batch_size; trainer.batch_size (16) plays no part. The
    refusal is the job's last line, as in a single process; the workers the agent restarts
    (trainer.max_restarts=2) stop at it before starting the job again (before: 3 starts)."""
    result = run_cli(
        "debug=fast",
        "modality=clinical",
        "stage=stage1",
        "data.small_sample=10",
        "trainer.nproc_per_node=2",
        "trainer.global_batch_size=12",
        "trainer.max_restarts=2",
        f"paths.root={tmp_path}",
        *SMALL_DATA,
    )
    assert result.returncode == 1
    message = (
        "the training split (10 samples) is smaller than one batch (12 = 6 per device x 2 workers); "
        "lower trainer.global_batch_size"
    )
    assert result.stderr.strip().splitlines()[-1] == f"mdfnet_hydra.train: error: {message}", result.stderr[-3000:]
    (run,) = tmp_path.glob("runs/*/*")
    log = (run / "logs" / "train.log").read_text()
    assert message in log and log.count("mdfnet-hydra: modality") == 1, log


def test_fewer_batches_per_epoch_than_grad_accum_are_refused_naming_the_effective_batch(tmp_path):
    """The window was cut to the epoch's batches without a word: effective batch 16 where the job's
    first lines said 32."""
    common = ["debug=fast", "modality=clinical", "stage=stage1", f"paths.root={tmp_path}", *SMALL_DATA]
    result = run_cli(*common, "data.small_sample=20")  # 1 batch of 16, trainer.grad_accum=2
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "mdfnet_hydra.train: error: trainer.grad_accum=2 needs 2 batches per epoch, but the training split "
        "(20 samples) in batches of 16 gives 1 per worker: the effective batch would be 16, not 32; lower "
        "trainer.grad_accum to 1 or lower trainer.batch_size (per device)"
    )
    limited = run_cli(*common, "trainer.limit_train_batches=1", f"hydra.run.dir={tmp_path / 'limited'}")
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr[-2000:]
    last = limited.stderr.strip().splitlines()[-1]
    assert last.endswith(
        "trainer.limit_train_batches=1 gives 1 per worker: the effective batch would be 16, not 32; lower "
        "trainer.grad_accum to 1 or raise trainer.limit_train_batches"
    ), last
    assert not list(tmp_path.glob("runs/*/*/stage1/checkpoints/*.pth")), "nothing trained"


def test_a_trained_vocabulary_smaller_than_the_text_needs_is_one_line(tmp_path):
    """It trained a larger, characters-only vocabulary than asked for, silently."""
    result = run_cli("debug=fast", "modality=text", "model.text.tokenizer_vocab_size=20", f"paths.root={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert re.search(r"model.text.tokenizer_vocab_size=20 is smaller than the \d+ tokens", line), line
    assert not list(tmp_path.glob("runs/*/*/stage1/*.pth")), "nothing trained"


def test_evaluate_without_experiments_dir_says_what_to_pass(tmp_path):
    result = module("mdfnet_hydra.evaluate", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "mdfnet_hydra.evaluate: error: experiments_dir is not set (it is ??? in the config): pass experiments_dir=<value>"
    )
    assert not (tmp_path / "results").exists(), "no results/ holding only Hydra's record"


def test_evaluation_options_out_of_range_are_one_line_before_any_run_is_read(tmp_path):
    """A negative bootstrap count or a sensitivity above 1 would give a report without intervals or
    thresholds: refused, every such option named at once, and results/ not left behind. (The
    experiments directory does not exist: the options are checked before any run is looked for.)"""
    result = module(
        "mdfnet_hydra.evaluate",
        f"experiments_dir={tmp_path / 'absent'}",
        "evaluation.n_bootstrap=-1",
        "evaluation.target_sensitivity=1.5",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "mdfnet_hydra.evaluate: error: invalid configuration:\n"
        "  - evaluation.n_bootstrap must be >= 0 (0: no intervals or p-values), got -1\n"
        "  - evaluation.target_sensitivity must be within (0, 1], got 1.5"
    )
    assert not (tmp_path / "results").exists()


def test_prepare_without_output_dir_says_what_to_pass(tmp_path):
    """output_dir names prepare's run directory, which Hydra resolves before the task function runs."""
    result = module("mdfnet_hydra.prepare", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "mdfnet_hydra.prepare: error: output_dir is not set (it is ??? in the config): pass output_dir=<value>"
    )
    assert not list(tmp_path.iterdir())
    full = module("mdfnet_hydra.prepare", cwd=tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "output_dir is not set" in full.stderr


def test_cfg_job_resolve_prints_the_run_directory_a_job_would_use(tmp_path):
    result = run_cli("--cfg", "job", "--resolve", f"paths.root={tmp_path}", exact=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.strip().startswith("run_dir:")]
    assert re.fullmatch(
        rf"run_dir: {re.escape(str(tmp_path))}/runs/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d_all_two_stage", line.strip()
    ), line
    chosen = run_cli("--cfg", "job", "--resolve", f"hydra.run.dir={tmp_path / 'mine'}", exact=True)
    assert f"run_dir: {tmp_path / 'mine'}" in chosen.stdout
    assert not list(tmp_path.iterdir()), "printing the config creates nothing"


def test_summary_of_a_missing_or_non_sweep_directory_says_so(tmp_path):
    missing = module("mdfnet_hydra.summary", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"mdfnet_hydra.summary: error: {tmp_path / 'nope'} does not exist"
    (tmp_path / "notes").mkdir()
    empty = module("mdfnet_hydra.summary", str(tmp_path))
    assert empty.returncode == 1 and f"{tmp_path} holds no job directories" in empty.stderr
    single = tmp_path / "run"
    (single / ".hydra").mkdir(parents=True)
    (single / ".hydra" / "overrides.yaml").write_text("[]\n")
    (single / "notes").mkdir()
    result = module("mdfnet_hydra.summary", str(single))
    assert result.returncode == 1 and f"{single} is a single run, not a sweep" in result.stderr
    assert not list(tmp_path.rglob("results_summary.csv")), "no header-only table"


def test_ctrl_c_during_a_checkpoint_write_is_still_an_interrupt(capsys):
    """A Ctrl-C that lands inside torch.save: torch's zip writer then fails closing the file and
    raises a RuntimeError from the KeyboardInterrupt (seen in CI: `unexpected pos 58496 vs 58448`).
    The job still ends as interrupted (status 130, one line), not with a traceback."""
    import pytest

    from mdfnet_hydra.cli import INTERRUPTED_STATUS, is_interrupt, reported

    with pytest.raises(SystemExit) as ended:
        with reported("mdfnet_hydra.train"):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:  # (torch chains it implicitly, as here)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 58496 vs 58448")  # noqa: B904
    assert ended.value.code == INTERRUPTED_STATUS == 130
    assert capsys.readouterr().err.strip().startswith("mdfnet_hydra.train: interrupted (Ctrl-C)")
    assert not is_interrupt(RuntimeError("unexpected pos 58496 vs 58448")), "the same error without a Ctrl-C"


def test_ctrl_c_prints_where_the_run_stands_and_the_command_that_resumes_it(tmp_path, output_root):
    args = [
        "debug=fast",
        "modality=clinical",
        "stage=stage1",
        "phases.stage1.epochs=3",
        *SMALL_DATA,
        f"paths.root={tmp_path}",
        f"paths.data_dir={output_root}/data",
        f"paths.cache_dir={output_root}/cache",
        "evaluation.on_finish=false",
    ]
    status, stderr = interrupted_cli(
        *args, when=lambda: bool(list(tmp_path.glob("runs/*/*/stage1/checkpoints/last.pth")))
    )
    (run_dir,) = tmp_path.glob("runs/*/*")
    assert status == 130, stderr[-3000:]
    (line,) = stderr.strip().splitlines()
    stands = re.match(
        rf"mdfnet_hydra.train: interrupted \(Ctrl-C\); run directory {re.escape(str(run_dir))}: stage1 "
        r"checkpointed after epoch ([12]) of 3\. Resume with: python -m mdfnet_hydra.train ",
        line,
    )
    assert stands, line
    command = shlex.split(line.split("Resume with: ", 1)[1])
    assert command[-1] == f"hydra.run.dir={run_dir}"
    resumed = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = run_dir / "stage1" / "checkpoints" / "last.pth"
    assert f"stage1: resumed from {last} after epoch {stands.group(1)}" in resumed.stdout
    assert (run_dir / "metrics.json").is_file() and list(tmp_path.glob("runs/*/*")) == [run_dir], (
        "in the same directory"
    )


def test_sigterm_raises_only_where_no_one_else_handles_it():
    """Python's default SIGTERM becomes `Terminated` within the block and comes back after it; a
    handler already installed (submitit's job environment, which handles its own requeue) stays."""
    from mdfnet_hydra.signals import Terminated, sigterm_unwinds

    def bypass(signum, frame):
        bypass.seen = signum

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (whatever the test runner set)
    try:
        with sigterm_unwinds():
            with pytest.raises(Terminated):
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        signal.signal(signal.SIGTERM, bypass)
        with sigterm_unwinds():
            signal.raise_signal(signal.SIGTERM)
        assert bypass.seen == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is bypass
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_requeue_signal_during_a_checkpoint_write_lands_after_it(tmp_path):
    """submitit's requeue handler calls sys.exit wherever SIGUSR2 lands; inside torch.save the zip
    writer turned that exit into its own RuntimeError ("unexpected pos"), and the requeued trial was
    recorded as failed (CI, 2026-11-28). The signal now waits for the write: the checkpoint is whole,
    then the exit comes. The signal is sent from a thread once the temporary file has data."""
    import threading

    import torch

    from mdfnet_hydra.checkpoint import load_checkpoint, save_atomic
    from mdfnet_hydra.files import temporary_name
    from mdfnet_hydra.signals import signals_held

    def requeue_and_exit(signum, frame):  # what submitit's handler does once it has requeued the job
        requeue_and_exit.calls += 1
        sys.exit(-1)

    requeue_and_exit.calls = 0
    path = tmp_path / "last.pth"
    state = {"model": {f"w{i}": torch.full((1_000_000,), float(i)) for i in range(48)}}  # 192 MB: ~0.3 s
    writing = temporary_name(path)

    def signal_mid_write():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if writing.exists() and writing.stat().st_size > 0:
                os.kill(os.getpid(), signal.SIGUSR2)
                return
            time.sleep(0.0005)

    before = signal.signal(signal.SIGUSR2, requeue_and_exit)
    try:
        sender = threading.Thread(target=signal_mid_write)
        sender.start()
        with pytest.raises(SystemExit):
            save_atomic(state, path)
        sender.join()
        assert requeue_and_exit.calls == 1 and signal.getsignal(signal.SIGUSR2) is requeue_and_exit
        loaded = load_checkpoint(path)["model"]
        assert all(torch.equal(loaded[k], v) for k, v in state["model"].items())
        with pytest.raises(SystemExit):  # signals that arrive in the block are handled once it ends, once each
            with signals_held():
                signal.raise_signal(signal.SIGUSR2)
                signal.raise_signal(signal.SIGUSR2)
                assert requeue_and_exit.calls == 1
        assert requeue_and_exit.calls == 2
    finally:
        signal.signal(signal.SIGUSR2, before)


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2 workers: about 40 s
def test_sigterm_ends_the_job_with_a_line_in_its_log_and_the_resume_command(tmp_path, output_root, workers):
    """What scancel, a SLURM time limit or preemption send every process of the job: the run's log
    says so (Python's default ended the process without a word), the console gives the Ctrl-C line
    with SIGTERM's status, 143; with two workers the launcher says it, not torch's traceback."""
    args = [
        "debug=fast",
        "modality=clinical",
        "stage=stage1",
        "phases.stage1.epochs=4",
        *SMALL_DATA,
        f"paths.root={tmp_path}",
        f"paths.data_dir={output_root}/data",
        f"paths.cache_dir={output_root}/cache",
        "evaluation.on_finish=false",
        f"trainer.nproc_per_node={workers}",
    ]
    status, stderr = interrupted_cli(
        *args, when=lambda: bool(list(tmp_path.glob("runs/*/*/stage1/checkpoints/last.pth"))), sig=signal.SIGTERM
    )
    (run_dir,) = tmp_path.glob("runs/*/*")
    assert status == 143, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"mdfnet_hydra.train: terminated (SIGTERM); run directory {run_dir}: stage1 "), line
    assert "Resume with: python -m mdfnet_hydra.train " in line and "Traceback" not in stderr, stderr[-3000:]
    log = (run_dir / "logs" / "train.log").read_text().strip().splitlines()  # the job's log, as for Ctrl-C
    assert "terminated (SIGTERM: scancel, a time limit or preemption); rerun the same command to resume" in log[-1]


def test_evaluate_on_a_device_the_machine_lacks_is_one_line_before_any_run_is_read(tmp_path):
    """evaluation.device=cuda on a machine without CUDA: refused at start, naming evaluation.device
    (not trainer.device), even where saved predictions would never need the device."""
    (tmp_path / "runs").mkdir()
    result = module(
        "mdfnet_hydra.evaluate", f"experiments_dir={tmp_path / 'runs'}", "evaluation.device=cuda", cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().startswith(
        "mdfnet_hydra.evaluate: error: evaluation.device=cuda but the machine has no CUDA"
    ), result.stderr[-2000:]
    assert result.stderr.strip().endswith("use evaluation.device=cpu")
    assert not (tmp_path / "results").exists()


DIVERGING = [  # a learning rate that turns the weights NaN in the second epoch (warmup from 1e-33 x 1e30 in the first)
    "debug=fast",
    "modality=clinical",
    "stage=stage1",
    "data.small_sample=null",
    "trainer.limit_val_batches=null",
    "trainer.limit_train_batches=2",
    "phases.stage1.lr=1e30",
    "phases.stage1.epochs=2",
    "phases.stage1.warmup_epochs=1",
    "scheduler.warmup_start_factor=1e-33",
]


def test_a_diverged_epoch_is_one_line_and_never_replaces_the_best_checkpoint(tmp_path, output_root):
    """Its NaN predictions were scored (torchmetrics gave an AUROC of about 0.5), became the best
    checkpoint, the test predictions and metrics.json (with bare NaN), and the job succeeded."""
    run_dir = tmp_path / "run"
    result = run_cli(
        *DIVERGING,
        f"paths.root={tmp_path}",
        f"paths.data_dir={output_root}/data",
        f"hydra.run.dir={run_dir}",
        *SMALL_DATA,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(
        r"mdfnet_hydra\.train: error: stage1: training diverged: (\d+) of \1 val predictions after epoch 2 are NaN "
        r"or infinite \(loss nan\), so no checkpoint of epoch 2 is saved; try a lower learning rate \(now "
        r"phases\.stage1\.lr=1e\+30\) or trainer\.max_grad_norm=1\.0 \(gradient clipping\)",
        result.stderr.strip(),
    ), result.stderr[-3000:]
    checkpoints = run_dir / "stage1" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best_auroc.pth",
        "best_mean.pth",
        "best_rare.pth",
        "epoch_001.pth",
        "last.pth",
    ]
    from mdfnet_hydra.checkpoint import load_checkpoint

    assert {load_checkpoint(p)["epoch"] for p in checkpoints.iterdir()} == {1}, "epoch 1's bests and state stay"
    assert not (run_dir / "stage1" / "metrics.json").exists() and not (run_dir / "stage1" / "predictions").exists()
    assert "job failed: TrainingDiverged: stage1: training diverged" in (run_dir / "logs" / "train.log").read_text()


@pytest.mark.slow  # two workers, then two restarts that stop at once: about 40 s on 2 busy cores
def test_a_diverged_data_parallel_job_is_one_line_and_not_trained_again(tmp_path, output_root):
    """torch's elastic agent restarted the workers trainer.max_restarts=2 times, each training into the
    same NaN (about 28 s and 261 lines ending in ChildFailedError); now the restarted workers stop at
    the recorded divergence before any work (launch.py) and the job ends with its one line."""
    result = run_cli(
        "debug=fast",
        "modality=clinical",
        "stage=stage1",
        "trainer.nproc_per_node=2",
        "trainer.max_restarts=2",
        "phases.stage1.lr=1e8",
        "phases.stage1.epochs=3",
        f"paths.root={tmp_path}",
        f"paths.data_dir={output_root}/data",
        *SMALL_DATA,
        env_extra={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("mdfnet_hydra.train: error: stage1: training diverged: ") and "phases.stage1.lr=1e+08" in last
    )
    (run,) = tmp_path.glob("runs/*/*")
    log = (run / "logs" / "train.log").read_text()
    assert log.count("mdfnet-hydra: modality") == 1, "trained once, not again at each restart"
    assert log.count("job failed: TrainingDiverged") == 1, log[-3000:]
