"""A run directory belongs to one training config, and to one job at a time.

Rerunning a job continues it (a requeued SLURM job, a resumed Ctrl-C), so a run directory's
files are trusted by the next job that names it. That is only safe when the next job trains the
same thing and nobody else is writing there:

- A job records its resolved config in `<run>/.mdfnet/config.yaml`. Once the directory holds
  results (a checkpoint or a metrics.json), a later job whose config has another outcome identity
  (identity.py: what cannot change results, such as paths, logging, the time budget, loader and
  launch settings, may differ) is refused with the differing keys, and Hydra's `.hydra/` record,
  which it rewrote on start, is put back. Before that, a job that failed early (a typo, a batch
  too large) is simply replaced by the corrected one.
- The job holds an exclusive lock on `<run>/.mdfnet/lock` while it runs (the kernel releases it
  when the process ends, however it ends, so a killed job never leaves it stuck).

One process per job claims the directory: the single process, the launcher of data-parallel
workers (node 0's), or rank 0 of workers that torchrun / srun started (pipeline.py), which then
tells the other ranks whether it was refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from mdfnet_hydra.config import ConfigError, to_plain
from mdfnet_hydra.files import hold_lock, release_lock, write_text
from mdfnet_hydra.identity import EFFECTIVE_BATCH, outcome_identity

log = logging.getLogger(__name__)

RECORD_DIR = ".mdfnet"
HYDRA_RECORD = ".hydra"
EFFECTIVE_BATCH_SHOWN = (
    "effective batch (trainer.batch_size x devices x trainer.grad_accum, or trainer.global_batch_size)"
)
REQUEUE_LOCK_WAIT_S = 300  # a requeued SLURM job waits this long for a lost node's lock (NFS leases)


class RunDirectoryBusy(RuntimeError):
    """Another job is running in the run directory."""


class RunDirectoryConflict(ConfigError):
    """The run directory holds the results of another training config."""


@contextmanager
def claim(cfg: DictConfig, run_dir: Optional[Path] = None) -> Iterator[Path]:
    """Hold the run directory for this job: the lock, then the config record checked."""
    run_dir = Path(str(cfg.paths.run_dir)) if run_dir is None else run_dir
    try:
        handle = acquire_lock(run_dir, wait_s=REQUEUE_LOCK_WAIT_S if _requeued() else 0.0)
    except RunDirectoryBusy:
        _restore_hydra_record(run_dir)
        raise
    try:
        check_config(cfg, run_dir)
        yield run_dir
    finally:
        if handle is not None:
            release_lock(handle)


def acquire_lock(run_dir: Path, wait_s: float = 0.0):
    """An open file holding an exclusive lock on `<run>/.mdfnet/lock` (None where the file system
    has no locks), polling up to `wait_s` seconds for another holder."""
    path = run_dir / RECORD_DIR / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = hold_lock(path.open("a+"))  # (not also held by the DataLoader workers this process forks)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            handle.seek(0)
            owner = handle.read().strip() or "owner not recorded yet"
            release_lock(handle)
            raise RunDirectoryBusy(
                f"another job is running in {run_dir} ({owner}); wait for it to end, or give this job "
                f"its own directory (hydra.run.dir=...)"
            ) from None
        except OSError as err:  # ENOLCK / ENOSYS / EOPNOTSUPP: Lustre without -o flock, NFS with nolock
            release_lock(handle)
            log.warning(
                "%s: the file system refuses locks (%s): one job at a time in %s is not enforced there",
                path,
                err.strerror or err,
                run_dir,
            )
            return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _requeued() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def job_restart() -> Optional[tuple[str, tuple[str, ...]]]:
    """(what restarted, the `job_identity` keys that make it the same job) when this process
    restarts a job: torchrun's restart of failed workers (`trainer.max_restarts`: the same
    rendezvous run, within the same SLURM job if any) or a requeued SLURM job (its timeout signal,
    a lost node: the same SLURM job id; torchrun inside it starts a new run). None for a job's
    first start. A counter alone does not prove it (`sbatch` hands the submitting shell's
    SLURM_RESTART_COUNT on to new jobs): a caller compares those keys with what the start recorded."""
    count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if count > 0:
        return f"torchrun restart {count}", ("slurm_job", "torchrun_run")
    count = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if count > 0:
        return f"SLURM requeue {count}", ("slurm_job",)
    return None


def job_identity() -> dict[str, Optional[str]]:
    """What stays the same across a job's restarts: its SLURM job id and torchrun's run id."""
    return {
        "slurm_job": os.environ.get("SLURM_JOB_ID") or None,
        "torchrun_run": os.environ.get("TORCHELASTIC_RUN_ID") or None,
    }


def check_config(cfg: DictConfig, run_dir: Path) -> None:
    """Record this job's config, or refuse it where the directory holds results of another config."""
    current = to_plain(cfg)
    recorded, source = recorded_config(run_dir)
    differences = config_differences(recorded, current) if recorded is not None else []
    if differences and not has_results(run_dir):
        log.info(
            "%s: replacing the record of a job that left no results (it differed in %s)",
            run_dir,
            "; ".join(differences[:3]),
        )
        differences = []
    if not differences:
        write_text(run_dir / RECORD_DIR / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(current)))
        _keep_hydra_record(run_dir)  # the .hydra/ of the latest job that was let in
        return
    _restore_hydra_record(run_dir)
    shown = "; ".join(differences[:12]) + (f"; and {len(differences) - 12} more" if len(differences) > 12 else "")
    raise RunDirectoryConflict(
        f"{run_dir} holds results of another training config (recorded in {source}); this job differs in: "
        f"{shown}. Use the recorded values to continue that run, or give this job its own directory "
        f"(hydra.run.dir=...)"
    )


def has_results(run_dir: Path) -> bool:
    """Whether any phase left a checkpoint or a result here (what a later job would trust)."""
    return any(run_dir.glob("*/checkpoints/*.pth")) or any(run_dir.glob("*/metrics.json"))


def recorded_config(run_dir: Path) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    """The config a run directory was made with: its record, or (directories made before records
    existed) the config.yaml a stage wrote when it started."""
    candidates = [run_dir / RECORD_DIR / "config.yaml"] + sorted(run_dir.glob("stage*/config.yaml"))
    for path in candidates:
        if path.is_file():
            try:
                node = OmegaConf.load(path)
            except Exception as err:  # noqa: BLE001 - a damaged record is named, not trusted
                raise RunDirectoryConflict(
                    f"the run record {path} is damaged ({type(err).__name__}); move it away to adopt this job's config"
                ) from err
            return OmegaConf.to_container(node, resolve=False), path
    return None, None


def config_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key (recorded, now)` for each key of the record's outcome identity that differs now. Keys
    the record lacks (added to the schema since) are not compared; the effective batch is compared
    as such, with the batch keys that make it shown."""
    old, new = outcome_identity(recorded), outcome_identity(current)
    out = []
    for key in sorted(old):
        if key not in new or _normal(new[key]) != _normal(old[key]):
            name = EFFECTIVE_BATCH_SHOWN if key == EFFECTIVE_BATCH else key
            out.append(f"{name} ({_show(old[key])} recorded, {_show(new.get(key, '<absent>'))} now)")
    return out


def _normal(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _show(value: Any) -> str:
    text = _normal(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _keep_hydra_record(run_dir: Path) -> None:
    """A copy of Hydra's `.hydra/` as an accepted job wrote it, to put back after a refused job."""
    source, copy = run_dir / HYDRA_RECORD, run_dir / RECORD_DIR / "hydra"
    if source.is_dir():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(source, copy)


def _restore_hydra_record(run_dir: Path) -> None:
    copy = run_dir / RECORD_DIR / "hydra"
    if copy.is_dir():
        for path in copy.iterdir():
            write_text(run_dir / HYDRA_RECORD / path.name, path.read_text())
