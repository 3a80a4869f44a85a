"""Who am I in a distributed job, and the few collectives the trainer needs.

A process is a worker of a data-parallel job when torchrun / torch's elastic agent started it
(RANK, LOCAL_RANK, WORLD_SIZE set) or when SLURM started one task per GPU (SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS). Otherwise it is a single process, or the Hydra job that launches
workers itself (see launch.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar


@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    local_rank: int
    world_size: int
    source: str  # "torchrun" or "slurm"


def worker_env(environ: Mapping[str, str] = os.environ, nproc_per_node: int = 1) -> Optional[WorkerEnv]:
    """This process's place in a data-parallel job, or None for a single process / a launcher."""
    if all(k in environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return WorkerEnv(int(environ["RANK"]), int(environ["LOCAL_RANK"]), int(environ["WORLD_SIZE"]), "torchrun")
    ntasks = int(environ.get("SLURM_NTASKS", "1"))
    # One SLURM task per GPU: the tasks are the workers. With one task per node the task is a
    # launcher (nproc_per_node > 1) and its elastic agent sets RANK etc. for the workers.
    if "SLURM_PROCID" in environ and ntasks > 1 and nproc_per_node == 1:
        return WorkerEnv(int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", "0")), ntasks, "slurm")
    return None


def slurm_master(environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """Address of the job's first node and a port derived from the job id (same on every task)."""
    from submitit.slurm.slurm import SlurmJobEnvironment  # parses SLURM_JOB_NODELIST ("gpu[07-08]")

    hosts = SlurmJobEnvironment().hostnames
    port = 20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000
    return hosts[0], port


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_process_group(env: WorkerEnv, backend: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = timedelta(minutes=30)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The elastic agent keeps one store for all restarts of the worker group, so a restarted
        # rank can read the dead group's gloo / NCCL addresses before its peers replace them
        # (seen with torch 2.14: "connectFullMesh failed ... Connection refused"). Keys under a
        # per-attempt prefix are always this group's own.
        store = dist.PrefixStore(
            f"mdfnet_hydra/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/",
            dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                env.world_size,
                is_master=False,
                timeout=timeout,
            ),
        )
        dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
        return
    if env.source == "slurm" and "MASTER_ADDR" not in os.environ:
        host, port = slurm_master()
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))
    dist.init_process_group(
        backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout
    )


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


T = TypeVar("T")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def main_first(is_main: bool) -> Callable[[Callable[[], T]], T]:
    """Run a build on rank 0 first (it fills a shared cache), then on the other ranks (they read it)."""

    def first(build: Callable[[], T]) -> T:
        built = build() if is_main else None
        barrier()
        return built if is_main else build()

    return first


def broadcast_from_main(value: str) -> str:
    """Rank 0's value on every rank (e.g. the run directory, so all ranks read what rank 0 writes)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def process_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's global rank before any process group exists (0 when not a worker)."""
    env = worker_env(environ)
    return env.rank if env is not None else 0


def mean_over_ranks(tensor):
    """The element-wise mean of a tensor over all ranks (itself when alone): a metric of every
    rank's samples, not rank 0's share (gloo has no average, so a sum divided by the ranks)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def all_gather_rows(tensor):
    """Concatenate equally shaped per-rank tensors along dim 0 in rank order (identity when alone)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


# ---------------------------------------------------------------- one run directory for all ranks
_AGREED: Optional[datetime] = None


def agreed_now(fmt: str) -> str:
    """`${now:...}` that every rank of a torchrun job resolves to the same instant.

    The first rank to ask writes its clock into the elastic agent's store; the others read it, so
    a run started with `torchrun -m mdfnet_hydra.train` gets one output directory, not one per rank
    (and keeps it when the agent restarts the workers).
    """
    global _AGREED
    if _AGREED is None:
        _AGREED = _store_agreed_time() if _in_torchrun_group() else (_slurm_start_time() or datetime.now())
    return _AGREED.strftime(fmt)


def _in_torchrun_group() -> bool:
    env = os.environ
    return int(env.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in env and "MASTER_PORT" in env


def _slurm_start_time() -> Optional[datetime]:
    """All tasks of a SLURM job see the same start time (Slurm >= 22.05 exports it)."""
    start = os.environ.get("SLURM_JOB_START_TIME")
    if start and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return datetime.fromtimestamp(int(start))
    return None


def _store_agreed_time() -> datetime:
    from torch.distributed import TCPStore

    env = os.environ
    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=120))
    key = f"mdfnet_hydra/run_time/{env.get('TORCHELASTIC_RUN_ID', 'run')}"
    mine = datetime.now().isoformat()
    agreed = store.compare_set(key, "", mine)
    return datetime.fromisoformat(agreed.decode() if isinstance(agreed, bytes) else agreed)


# ---------------------------------------------------------------- what every rank must agree on
# Config keys that may differ between the ranks of one job: the node's own index (each node's
# launcher is told its own), and the run directory, which every rank takes from rank 0
# (pipeline.run: broadcast_from_main) and which srun tasks resolve from their own clocks.
PER_NODE_KEYS = ("trainer.node_rank", "paths.run_dir")


def node_index(config: Mapping) -> int:
    """This process's node as its user numbered it: `trainer.node_rank` of a launcher started on
    each node, else the elastic agent's node (GROUP_RANK: torchrun, SLURM one task per node), else
    SLURM's node of the task."""
    trainer = config.get("trainer") or {}
    if int(trainer.get("nnodes") or 1) > 1 and "SLURM_NODEID" not in os.environ:
        return int(trainer.get("node_rank") or 0)
    return int(os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "0")))


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    consecutive = ranks == list(range(ranks[0], ranks[-1] + 1))
    return f"ranks {ranks[0]}-{ranks[-1]}" if consecutive else "ranks " + ", ".join(map(str, ranks))


def config_differences(configs: list[tuple[int, dict]]) -> str:
    """'' when every rank's flat config equals rank 0's, else one message naming the nodes (ranks)
    that differ and each differing key with both values. `configs`: (node, flat config) by rank."""
    node0, reference = configs[0]
    by_node: dict[int, tuple[list[int], dict[str, Any]]] = {}
    for rank, (node, flat) in enumerate(configs):
        keys = sorted(k for k in set(reference) | set(flat) if reference.get(k, _ABSENT) != flat.get(k, _ABSENT))
        if keys:
            ranks, differing = by_node.setdefault(node, ([], {}))
            ranks.append(rank)
            for key in keys:
                differing.setdefault(key, flat.get(key, _ABSENT))
    if not by_node:
        return ""
    parts = []
    for node, (ranks, differing) in sorted(by_node.items()):
        values = ", ".join(
            f"{key} ({_shown(reference.get(key, _ABSENT))} on node {node0}, {_shown(value)} on node {node})"
            for key, value in differing.items()
        )
        who = f"node {node} ({_ranks(ranks)})" if node != node0 else f"{_ranks(ranks)} on node {node0}"
        parts.append(f"{who} was started with another config than node {node0}: {values}")
    return "; ".join(parts) + "; start every node with the same overrides (only trainer.node_rank differs)"


class _Absent:
    def __repr__(self) -> str:
        return "not set"


_ABSENT = _Absent()


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, _Absent) else str(value)


def refuse_differing_configs(config: dict) -> None:
    """Every rank's resolved config against rank 0's, once the process group is up and before any
    work: a node started with other overrides would otherwise train with other settings (or look
    for files rank 0 never made). All ranks learn every config, so all raise the same ConfigError
    together and none is left waiting in a collective."""
    import torch.distributed as dist

    from mdfnet_hydra.config import RefusedOnEveryTry
    from mdfnet_hydra.identity import flatten

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = {k: v for k, v in flatten(config).items() if not any(k == p or k.startswith(p + ".") for p in PER_NODE_KEYS)}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (node_index(config), flat))
    message = config_differences(gathered)
    if message:
        raise RefusedOnEveryTry(message)


def refuse_unseen(path: Path, what: str, fix: str, node: Optional[int] = None) -> None:
    """After rank 0 made `path` for every rank to read (a cache it built, then a barrier): each
    rank says whether it sees it, and all ranks fail together, naming rank 0's path and the ranks
    that do not see it, when any does not (a node-local disk where a shared file system was
    needed). `node`: this rank's node as node_index numbers it (default: the agent's / SLURM's)."""
    import torch.distributed as dist

    from mdfnet_hydra.config import ConfigError

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if node is None:
        node = int(os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "0")))
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (path.exists(), node, str(path)))
    blind = [rank for rank, (exists, _, _) in enumerate(seen) if not exists]
    if blind:
        nodes = sorted({seen[rank][1] for rank in blind})
        where = ", ".join(f"node {n} ({_ranks([r for r in blind if seen[r][1] == n])})" for n in nodes)
        raise ConfigError(f"{what} {seen[0][2]}, built by rank 0, is not visible on {where}: {fix}")
