"""The full model's stage-2 step in n CPU processes (gloo), per-process batch fixed: how the step
scales with data-parallel workers on this machine."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mdfnet_hydra.benchmarks.timing import measure
from mdfnet_hydra.benchmarks.workload import Setup, optimizer_for, train_step

log = logging.getLogger(__name__)


def _ddp_worker(
    rank: int, world: int, port: int, cfg_yaml: str, length: Optional[int], steps: int, warmup: int, queue
) -> None:
    import torch.distributed as dist

    from mdfnet_hydra.distributed import WorkerEnv
    from mdfnet_hydra.machine import real_cpus
    from mdfnet_hydra.runtime import Runtime

    torch.set_num_threads(max(1, real_cpus() // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from mdfnet_hydra.config import load_train_config

        cfg = load_train_config(OmegaConf.create(cfg_yaml))
        runtime = Runtime.from_config(
            cfg.trainer, WorkerEnv(rank=rank, local_rank=rank, world_size=world, source="torchrun")
        )
        setup = Setup(cfg, [m.value for m in cfg.modality.inputs], runtime, length)
        from torch.nn.parallel import DistributedDataParallel

        from mdfnet_hydra.losses import MultiLabelLoss

        model = setup.model(frozen=False)
        ddp = DistributedDataParallel(model)
        step = train_step(
            ddp,
            optimizer_for(model, cfg, "stage2", runtime),
            MultiLabelLoss(cfg.loss),
            runtime,
            cfg.trainer,
            setup.compile_plan(),
        )
        staged = setup.batches(4)
        counter = iter(range(10**9))
        result = measure(
            f"ddp/{world} rank {rank}", lambda: step(staged[next(counter) % 4]), runtime.device, steps, warmup
        )
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def bench_ddp(cfg: DictConfig, workers: int, length: Optional[int], steps: int, warmup: int) -> dict[str, Any]:
    """The full model's stage-2 step in `workers` CPU processes; samples/s summed over them."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.device = "cpu"
    yaml = OmegaConf.to_yaml(cfg, resolve=True)
    mp.start_processes(
        _ddp_worker,
        args=(workers, port, yaml, length, steps, warmup, queue),
        nprocs=workers,
        join=True,
        start_method="spawn",
    )
    result = queue.get()
    result["samples_per_s"] *= workers  # every worker processes its own batch per step
    result["workers"] = workers
    log.info("%-22s %9.1f samples/s over %d processes", f"ddp/{workers}", result["samples_per_s"], workers)
    return result
