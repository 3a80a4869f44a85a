"""What the entry point does with a composed config: train here, or start data-parallel workers.

- `trainer.nproc_per_node=N` (and/or `trainer.nnodes`): this Hydra job becomes the launcher. It
  starts N workers per node with torch's elastic agent (the engine behind torchrun: rendezvous,
  RANK / LOCAL_RANK / WORLD_SIZE, restarts up to `trainer.max_restarts`) and returns rank 0's result.
- Already a worker (started by torchrun, or one SLURM task per GPU): train directly.
- Otherwise: train in this process.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from mdfnet_hydra.config import ConfigError, RefusedOnEveryTry, global_batch_problem, refuse, validate_config
from mdfnet_hydra.distributed import worker_env
from mdfnet_hydra.files import write_text
from mdfnet_hydra.pruning import PruningTarget, TrialReporter, pruning_target
from mdfnet_hydra.run_directory import RunDirectoryBusy, RunDirectoryConflict, claim
from mdfnet_hydra.trial import Objective, in_multirun, objective_value, run_trial

log = logging.getLogger(__name__)
REFUSAL_FILE = "refusal.txt"


class WorkersRefused(ConfigError):
    """The data-parallel workers stopped at a user error (its message), which no restart can change."""


def run_job(cfg: DictConfig) -> Objective:
    """The task function's body, in the Hydra process. Returns the sweep objective (trial.py). A
    single run fails loudly; a multirun's job records a failure and the sweep goes on. The Hydra
    process is the one that knows whether this is a multirun: it tells the pipeline (and the
    workers it starts) whether to evaluate at the end (a multirun evaluates once, at its end)."""
    multirun = in_multirun()
    try:
        validate_config(cfg)
        refuse(world_size_problems(cfg))
        refused: Optional[ConfigError] = None
    except ConfigError as err:
        if not multirun:
            raise
        # this job's own values (a grid's combination, a sampled value) out of range: a failed trial
        # with its reason, and the sweep goes on (an Optuna sweep validated its shared config before
        # its study: sweep_study.py)
        refused = err
    claims = claims_run_directory(cfg)
    holder = claim(cfg) if claims else nullcontext()
    pruning = pruning_target(cfg) if multirun else None
    rank = worker_env(nproc_per_node=cfg.trainer.nproc_per_node)
    # one process per job writes its records: the one holding its run directory (a single process,
    # node 0's launcher), else global rank 0 of workers torchrun / srun started
    writer = claims or (rank is not None and rank.rank == 0)

    def train_here() -> dict:
        if refused is not None:
            raise refused
        summary = train(cfg, evaluate_at_end=not multirun, pruning=pruning)
        if pruning is not None and summary.get("pruned") and writer:
            mark_pruned(pruning)  # its files are written (rank 0 wrote them before returning)
        return summary

    if not multirun:
        with holder:
            return objective_value(cfg, train_here())
    try:
        with holder:
            return run_trial(cfg, Path(cfg.paths.run_dir), train_here, is_writer=writer)
    except (RunDirectoryBusy, RunDirectoryConflict) as err:  # the directory is another job's: write nothing there
        log.error("trial not run: %s", err)
        return objective_value(cfg, {})


def world_size(cfg: DictConfig, environ=os.environ) -> int:
    """The job's workers over all nodes, known before any starts: torchrun's / SLURM's WORLD_SIZE in
    a worker, else the launcher's trainer.nproc_per_node x nodes (SLURM's nodes with one task per node)."""
    tc = cfg.trainer
    env = worker_env(environ, nproc_per_node=tc.nproc_per_node)
    if env is not None:
        return env.world_size
    topology = slurm_topology(environ)
    return int(tc.nproc_per_node) * (topology[0] if topology is not None else int(tc.nnodes))


def world_size_problems(cfg: DictConfig, environ=os.environ) -> list[str]:
    """What the world size rules out, refused before any worker starts (a worker's refusal is a crash
    to the elastic agent, which restarts the group trainer.max_restarts times)."""
    problem = global_batch_problem(cfg.trainer.global_batch_size, world_size(cfg, environ))
    return [problem] if problem else []


def mark_pruned(pruning: PruningTarget) -> None:
    """Record the pruned trial PRUNED in the study itself (whatever launched the job). Should the
    storage fail now, the job is not failed for it: the sweeper records a trial carrying its
    pruner's decision as PRUNED when the job returns (sweep_study.py)."""
    try:
        TrialReporter(pruning).mark_pruned()
    except Exception as err:  # noqa: BLE001 - the decision is on the trial already
        log.warning("could not record trial %d as pruned (%s); the sweeper records it", pruning.trial_number, err)


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


def train(cfg: DictConfig, evaluate_at_end: bool = True, pruning: PruningTarget | None = None) -> dict:
    """Train here, or start the data-parallel workers and return rank 0's job summary."""
    tc = cfg.trainer
    if worker_env(nproc_per_node=tc.nproc_per_node) is None:
        topology = slurm_topology()
        if tc.nproc_per_node > 1 or tc.nnodes > 1 or topology is not None:
            from mdfnet_hydra.machine import Machine
            from mdfnet_hydra.runtime import refuse_gpus_hidden_by_the_launcher

            refuse_gpus_hidden_by_the_launcher(tc.device, Machine.detect())  # here once, not in each worker
            return launch_workers(cfg, topology, evaluate_at_end, pruning)
    from mdfnet_hydra.pipeline import run

    return run(
        cfg,
        claim_run_dir=worker_env(nproc_per_node=tc.nproc_per_node) is not None,
        evaluate_at_end=evaluate_at_end,
        pruning=pruning,
    )


def slurm_topology(environ=os.environ) -> Optional[tuple[int, int, str, str]]:
    """(nnodes, node_rank, rendezvous endpoint, run id) for one SLURM task per node on several nodes."""
    nodes = int(environ.get("SLURM_NNODES", "1"))
    if "SLURM_JOB_ID" not in environ or nodes < 2 or int(environ.get("SLURM_NTASKS", "1")) != nodes:
        return None
    from mdfnet_hydra.distributed import slurm_master

    host, port = slurm_master(environ)
    return nodes, int(environ.get("SLURM_NODEID", "0")), f"{host}:{port}", f"slurm-{environ['SLURM_JOB_ID']}"


def launch_workers(
    cfg: DictConfig,
    topology: Optional[tuple[int, int, str, str]] = None,
    evaluate_at_end: bool = True,
    pruning: Optional[PruningTarget] = None,
) -> dict:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
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
        nproc,
        nnodes,
        backend,
        endpoint,
        tc.max_restarts,
    )
    if nnodes > 1:
        log.info(
            "waiting for %d nodes at %s (rendezvous %s; torch gives up after %d s)",
            nnodes,
            endpoint,
            run_id,
            rendezvous_timeout(config),
        )
    payload = OmegaConf.to_yaml(cfg, resolve=True)
    # the workers' share of the CPUs, for the workers only (torch reads it at their start); this
    # process's next job (a sweep's next trial) chooses its own threads again
    threads_set_here = "OMP_NUM_THREADS" not in os.environ
    with tempfile.TemporaryDirectory(prefix="mdfnet-workers-") as scratch:
        refusal = Path(scratch) / REFUSAL_FILE
        try:
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, real_cpus() // nproc)))
            # restarted workers stop at a recorded refusal on one node only: on several, another
            # node's workers, stopped before they met it, would start again and wait for this one's
            shortcut = str(refusal) if nnodes == 1 else ""
            results = elastic_launch(config, entrypoint=worker)(
                payload, evaluate_at_end, pruning, str(refusal), shortcut
            )
        except ChildFailedError as err:  # (after the restarts)
            if refusal.is_file():  # one line, as the same refusal in a single process gives
                failed = (f"rank {r} (exit code {f.exitcode}, {f.error_file})" for r, f in err.failures.items())
                log.warning("workers stopped at a refused config: %s", ", ".join(failed))
                raise WorkersRefused(refusal.read_text()) from None
            raise
        finally:
            if threads_set_here:
                os.environ.pop("OMP_NUM_THREADS", None)
    rank = min(results)  # global rank 0 on node 0; the lowest local worker elsewhere
    return results[rank]


def rendezvous_timeout(config) -> int:
    """Seconds torch's agent waits for every node to join: the static rendezvous's `timeout`
    (LaunchConfig sets 900), c10d's `join_timeout` (600 unless rdzv_configs sets it)."""
    if config.rdzv_backend == "static":
        return int(config.rdzv_configs["timeout"])
    if "join_timeout" in config.rdzv_configs:
        return int(config.rdzv_configs["join_timeout"])
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousTimeout

    return int(RendezvousTimeout().join.total_seconds())


def worker(
    payload: str,
    evaluate_at_end: bool = True,
    pruning: Optional[PruningTarget] = None,
    refusal: str = "",
    stop_at: str = "",
) -> dict:
    """Entry point of a spawned worker: the launcher's resolved config, then the pipeline."""
    from torch.distributed.elastic.multiprocessing.errors import record

    paths = [Path(p) if p else None for p in (refusal, stop_at)]
    return record(_worker)(payload, evaluate_at_end, pruning, *paths)


def _worker(
    payload: str,
    evaluate_at_end: bool,
    pruning: Optional[PruningTarget],
    refusal: Optional[Path],
    stop_at: Optional[Path],
) -> dict:
    """A refusal that follows from the config and the data alone (RefusedOnEveryTry: a batch the
    data cannot fill, nodes started with other settings) is met again at every try: the first
    worker to meet it writes its message to `refusal` (a file of the launcher's on this node), which
    the launcher raises once the agent gives up, and workers that find it at `stop_at` (the agent's
    restarts, trainer.max_restarts) fail with it at once, before any work. (Config refusals name
    settings, never patients: other errors, which may name files, are not written.)"""
    from mdfnet_hydra.config import load_train_config

    if stop_at is not None and stop_at.is_file():
        raise WorkersRefused(stop_at.read_text())
    try:
        return _run_worker(load_train_config(OmegaConf.create(payload)), evaluate_at_end, pruning)
    except RefusedOnEveryTry as err:
        if refusal is not None and not refusal.is_file():
            from mdfnet_hydra.cli import one_message

            write_text(refusal, one_message(err))
        raise


def _run_worker(cfg: DictConfig, evaluate_at_end: bool, pruning: Optional[PruningTarget]) -> dict:
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s", "%H:%M:%S"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    from mdfnet_hydra.pipeline import run

    return run(cfg, evaluate_at_end=evaluate_at_end, pruning=pruning)
