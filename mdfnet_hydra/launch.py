"""What the entry point does with a composed config: train here, or start data-parallel workers.

- `trainer.nproc_per_node=N` (and/or `trainer.nnodes`): this Hydra job becomes the launcher. It
  starts N workers per node with torch's elastic agent (the engine behind torchrun: rendezvous,
  RANK / LOCAL_RANK / WORLD_SIZE, restarts up to `trainer.max_restarts`) and returns rank 0's result.
- Already a worker (started by torchrun, or one SLURM task per GPU): train directly.
- Otherwise: train in this process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Union

from omegaconf import DictConfig, OmegaConf

from mdfnet_hydra.config import ConfigError, TrainConfig, validate_config
from mdfnet_hydra.distributed import worker_env
from mdfnet_hydra.files import write_text
from mdfnet_hydra.tracking import public_message, public_traceback
from mdfnet_hydra.run_directory import RunDirectoryBusy, RunDirectoryConflict, claim

log = logging.getLogger(__name__)
FAILURE_FILE = "failure.json"


def run_job(cfg: DictConfig) -> Union[float, list[float]]:
    """The task function's body. Returns the sweep objective: validation mean AUROC, or with
    `hparams.objective=multi` the pair (mean AUROC, minimum per-label AUROC); NaN when undefined.

    In a multirun a failing job (exception, NaN loss, out of memory) is recorded in its directory
    (failure.json) and returns NaN, which Optuna records as a failed trial, so one bad trial never
    ends a sweep; past `hparams.max_failure_rate` the sweep is aborted. A single run fails loudly.
    """
    validate_config(cfg)
    holder = claim(cfg) if claims_run_directory(cfg) else nullcontext()
    if not in_multirun():
        with holder:
            return objective_value(cfg, train(cfg))
    run_dir = Path(cfg.paths.run_dir)
    failure = run_dir / FAILURE_FILE
    try:
        with holder:
            return _trial(cfg, run_dir, failure)
    except (RunDirectoryBusy, RunDirectoryConflict) as err:  # the directory is another job's: write nothing there
        log.error("trial not run: %s", err)
        return objective_value(cfg, {})


def _trial(cfg: DictConfig, run_dir: Path, failure: Path) -> Union[float, list[float]]:
    failure.unlink(missing_ok=True)  # a resumed or requeued trial starts with a clean record
    try:
        value = objective_value(cfg, train(cfg))
        if any(math.isnan(v) for v in _as_list(value)):
            _record_failure(failure, "objective undefined (no epoch finished, or no label with both classes in val)", None)
        return value
    except Exception as err:  # noqa: BLE001 - every failure becomes a failed trial with its reason
        text = public_message(err).strip()
        reason = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        log.error("job failed: %s", reason)
        _record_failure(failure, reason, public_traceback(err))
        _abort_if_too_many_failures(cfg, run_dir.parent, reason)
        return objective_value(cfg, {})


def claims_run_directory(cfg: DictConfig) -> bool:
    """Whether this process holds the run directory for its job (run_directory.py): a single
    process, or the launcher of node 0. Workers that torchrun / srun started claim it in the
    pipeline (rank 0, once their process group exists)."""
    tc = cfg.trainer
    if worker_env(nproc_per_node=tc.nproc_per_node) is not None:
        return False
    topology = slurm_topology()
    if topology is not None:
        return topology[1] == 0
    return int(tc.nnodes) == 1 or int(tc.node_rank) == 0


def train(cfg: DictConfig) -> dict:
    """Train here, or start the data-parallel workers and return rank 0's job summary."""
    tc = cfg.trainer
    if worker_env(nproc_per_node=tc.nproc_per_node) is None:
        topology = slurm_topology()
        if tc.nproc_per_node > 1 or tc.nnodes > 1 or topology is not None:
            return launch_workers(cfg, topology)
    from mdfnet_hydra.pipeline import run

    return run(cfg, claim_run_dir=worker_env(nproc_per_node=tc.nproc_per_node) is not None)


def objective_value(cfg: DictConfig, summary: dict) -> Union[float, list[float]]:
    mean = _nan_if_none(summary.get("objective"))
    if cfg.get("hparams") is not None and cfg.hparams.objective == "multi":
        return [mean, _nan_if_none(summary.get("auroc_min"))]
    return mean


_WORKER_OF_MULTIRUN_JOB = False  # set in workers that a multirun job's launcher started


def in_multirun() -> bool:
    """Whether this job is one of a multirun's: the Hydra job itself, or a data-parallel worker
    its launcher started (a fresh interpreter that does not inherit Hydra's mode)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if _WORKER_OF_MULTIRUN_JOB:
        return True
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class SweepAborted(RuntimeError):
    """More trials failed than hparams.max_failure_rate allows."""


def _record_failure(path: Path, reason: str, trace: Optional[str]) -> None:
    if worker_env() is None or worker_env().rank == 0:
        write_text(path, json.dumps({"status": "failed", "reason": reason, "traceback": trace}, indent=2))


def _abort_if_too_many_failures(cfg: DictConfig, sweep_dir: Path, reason: str) -> None:
    if cfg.get("hparams") is None:
        return  # plain multiruns (ablations) run every job and report failures in the summary
    failed = len(list(sweep_dir.glob(f"*/{FAILURE_FILE}")))
    allowed = cfg.hparams.max_failure_rate * cfg.hparams.n_trials
    if failed > allowed:
        raise SweepAborted(
            f"{failed} trials failed, more than hparams.max_failure_rate={cfg.hparams.max_failure_rate} x "
            f"{cfg.hparams.n_trials} trials allows; aborting the sweep. Last failure: {reason}"
        )


def _as_list(value: Union[float, list[float]]) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _nan_if_none(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)


def slurm_topology(environ=os.environ) -> Optional[tuple[int, int, str, str]]:
    """(nnodes, node_rank, rendezvous endpoint, run id) for one SLURM task per node on several nodes."""
    nodes = int(environ.get("SLURM_NNODES", "1"))
    if "SLURM_JOB_ID" not in environ or nodes < 2 or int(environ.get("SLURM_NTASKS", "1")) != nodes:
        return None
    from mdfnet_hydra.distributed import slurm_master

    host, port = slurm_master(environ)
    return nodes, int(environ.get("SLURM_NODEID", "0")), f"{host}:{port}", f"slurm-{environ['SLURM_JOB_ID']}"


def launch_workers(cfg: DictConfig, topology: Optional[tuple[int, int, str, str]] = None) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    tc = cfg.trainer
    nproc = int(tc.nproc_per_node)
    if topology is not None:
        nnodes, node_rank, endpoint, run_id = topology
        backend = "c10d"
    else:
        nnodes, node_rank, endpoint, run_id = int(tc.nnodes), int(tc.node_rank), tc.rdzv_endpoint, tc.rdzv_id
        backend = tc.rdzv_backend
        if nnodes == 1 and not endpoint:  # like `torchrun --standalone`
            backend, endpoint = "c10d", "localhost:0"
        elif not endpoint:
            raise ConfigError("trainer.nnodes > 1 needs trainer.rdzv_endpoint=<host of node 0>:<port>")
    if not run_id:
        run_id = uuid.uuid4().hex if nnodes == 1 else "mdfnet"
    from mdfnet_hydra.machine import real_cpus

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, real_cpus() // nproc)))
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": node_rank} if backend == "static" else {},
        max_restarts=int(tc.max_restarts),
        start_method="spawn",
        monitor_interval=0.5,
    )
    log.info(
        "launching %d worker(s) per node on %d node(s) (rendezvous %s at %s, up to %d restarts)",
        nproc, nnodes, backend, endpoint, tc.max_restarts,
    )
    payload = OmegaConf.to_yaml(cfg, resolve=True)
    results = elastic_launch(config, entrypoint=worker)(payload, in_multirun())
    rank = min(results)  # global rank 0 on node 0; the lowest local worker elsewhere
    return results[rank]


def worker(payload: str, multirun: bool = False) -> dict:
    """Entry point of a spawned worker: the launcher's resolved config and Hydra mode, then the pipeline."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_worker)(payload, multirun)


def _worker(payload: str, multirun: bool) -> dict:
    global _WORKER_OF_MULTIRUN_JOB
    _WORKER_OF_MULTIRUN_JOB = multirun  # a multirun evaluates its runs once, at the sweep's end
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(payload))
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s", "%H:%M:%S"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    from mdfnet_hydra.pipeline import run

    return run(cfg)
