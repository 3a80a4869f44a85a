"""The launcher of `hydra/launcher=slurm`: hydra-submitit-launcher's, made safe across a requeue.

On a timeout or preemption signal, submitit's handler in the job calls the launcher's `checkpoint`,
then runs `scontrol requeue` on its own job and exits. Two races of submitit 1.5.4 with that requeue,
both reproduced on the local SLURM cluster of the tests (2026-11-28), made a requeued job look
failed:

- In the job: the requeue sends SIGTERM to every process of the job step, `scontrol` included, which
  can die of it before it returns (6 of 16 requeues of a sleeping job): submitit then reports an
  error and SLURM does not requeue. `checkpoint` now sets SIGTERM to ignored, which the `scontrol`
  child inherits (0 of 16 lost). The job's own process ignored it already, through submitit's handler.
- In the process that waits for the jobs: for a moment `sacct` reports the requeued job FAILED while
  `squeue` has it PENDING (6 of 26 requeues). submitit's watcher takes that for the end, and the
  sweep died with "has not produced any output (state: FAILED)" while its job went on to finish
  (CI, 2026-11-28). `launch` now believes a job over without a result only when `squeue` has lost
  it on two polls `REQUEUE_POLL_S` apart.

A job that is really over without a result (killed: the host out of memory, a node failure, scancel;
held by SLURM after a failed launch), or whose submitit wrapper failed outside the training, no
longer ends the wait for the others: its return is a failed JobReturn holding `JobLost`. Hydra's
basic sweeper raises it once every job of the batch is over (the summary is written first); the
Optuna sweep records it as a failed trial.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# squeue states of a job SLURM will still run (or is running): a requeued job passes through them.
# A held job (REQUEUE_HOLD, SPECIAL_EXIT, or pending with a reason naming a hold, as after a failed
# launch) waits for a person: not counted as still queued.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "RESIZING",
        "SUSPENDED",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
    }
)
REQUEUE_POLL_S = 30.0
# the job's SIGTERM handler that `checkpoint` replaced (not on the launcher: it is pickled to the job)
_SIGTERM_BEFORE_CHECKPOINT: list[Any] = []
# submitit's executor options that it takes at construction, named with the executor's prefix
_INIT_KEYS = ("max_num_timeout", "python")


def still_queued(job_id: str) -> bool | None:
    """Whether SLURM still has `job_id` (a job or an array task, "12_3") queued or running; None when
    the controller did not answer, which proves nothing either way. Without squeue, False: submitit's
    verdict stands, as before."""
    try:
        probe = subprocess.run(
            ["squeue", "-h", "-o", "%T|%r", "-j", job_id], capture_output=True, text=True, timeout=60
        )
    except OSError:
        return False
    except subprocess.TimeoutExpired:
        return None
    if probe.returncode != 0:
        # a job the controller has forgotten is an invalid id: that is an answer
        return False if "invalid job id" in probe.stderr.lower() else None
    for line in probe.stdout.splitlines():
        state, _, reason = line.partition("|")
        if state.strip() in ACTIVE_STATES and "held" not in reason.lower():
            return True
    return False


class JobLost(RuntimeError):
    """A SLURM job that ended without a result."""


def settled_result(job: Any, poll_s: float = REQUEUE_POLL_S) -> JobReturn:
    """The job's return once it is over. A job without a result file is over only once `squeue`
    has not had it on two polls `poll_s` apart: asked when submitit's watcher says it ended (sacct
    can say FAILED while SLURM has requeued it) and every `poll_s` in any case (sacct never lists an
    array task cancelled while it waited, which submitit then waits for forever). Raises submitit's
    UncompletedJobError for a job that is over without a result, as submitit does."""
    result_file = Path(job.paths.result_pickle)
    misses, told, next_poll = 0, False, time.monotonic() + poll_s
    while not result_file.exists():
        ended = job.done()
        if not ended and time.monotonic() < next_poll:
            time.sleep(1.0)
            continue
        queued = still_queued(job.job_id)
        if queued:
            if ended and not told:
                log.info(f"SLURM job {job.job_id} is queued again (requeued): waiting for it")
                told = True
            misses = 0
        elif queued is False:
            misses += 1
            if misses == 2:
                break
        next_poll = time.monotonic() + poll_s
        while time.monotonic() < next_poll and not result_file.exists():
            time.sleep(1.0)
    if result_file.exists():
        return job.results()[0]
    from submitit.core.utils import UncompletedJobError

    # (submitit's own results() would wait on for a job its watcher never saw end)
    raise UncompletedJobError(f"SLURM job {job.job_id} has not produced any output (state: {job.state})")


def job_return(job: Any, overrides: Sequence[str], poll_s: float = REQUEUE_POLL_S) -> JobReturn:
    """`settled_result`, with a job over without a result, or whose submitit wrapper failed outside
    the training (Hydra's job returns the training's own failures), as a failed JobReturn holding
    `JobLost`. Its message names the job and its log, never the job's traceback."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return settled_result(job, poll_s)
    except UncompletedJobError:
        lost = JobLost(
            f"SLURM job {job.job_id} ended without a result (state {job.state}): killed (the host out of "
            f"memory, a node failure, scancel) or held; its log: {job.paths.stderr}"
        )
    except FailedJobError:
        lost = JobLost(f"SLURM job {job.job_id} failed outside its training; its log: {job.paths.stderr}")
    log.error(str(lost))
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=lost)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher, with the same settings, whose jobs survive a requeue."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Runs the Hydra job in the SLURM job; a job that goes on after `checkpoint` (its requeue
        refused or failed, which ends its training) gets SIGTERM's handler back at its end."""
        try:
            return super().__call__(*args, **kwargs)
        finally:
            if _SIGTERM_BEFORE_CHECKPOINT and (before := _SIGTERM_BEFORE_CHECKPOINT.pop()) is not None:
                signal.signal(signal.SIGTERM, before)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Runs in the job, in submitit's signal handler, just before it calls `scontrol requeue`:
        from here on SIGTERM is ignored, by this process and by that `scontrol`."""
        if not _SIGTERM_BEFORE_CHECKPOINT:
            _SIGTERM_BEFORE_CHECKPOINT.append(signal.signal(signal.SIGTERM, signal.SIG_IGN))
        return super().checkpoint(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submits the jobs as one array, as the upstream launcher does, and waits for every one
        (`job_return`)."""
        import submitit

        assert self.config is not None and len(job_overrides) > 0
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in _INIT_KEYS},
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                key if key in shared else f"{self._EXECUTOR}_{key}": value
                for key, value in self.params.items()
                if key not in _INIT_KEYS and key != "submitit_folder"
            }
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for number, overrides in zip(numbers, job_overrides):
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        jobs = executor.map_array(
            self,
            [list(o) for o in job_overrides],
            ["hydra.sweep.dir"] * len(job_overrides),
            list(numbers),
            [f"job_id_for_{n}" for n in numbers],
            [state] * len(job_overrides),
        )
        return [job_return(job, overrides) for job, overrides in zip(jobs, job_overrides)]


def register_launcher() -> None:
    """Make `SlurmLauncher` a Hydra plugin (Hydra instantiates launchers only from registered classes)."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(SlurmLauncher)
