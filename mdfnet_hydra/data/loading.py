"""DataLoader settings from the machine: worker processes, pinned memory, persistent workers and
prefetch, each overridable in `data.*` (null = chosen here)."""

from __future__ import annotations

import os
from typing import Any


def cpus_per_process(runtime) -> int:
    """CPUs this process may use: its affinity set (SLURM's allocation) shared by the node's ranks."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // max(local_world, 1))


def default_num_workers(runtime, decodes_images: bool) -> int:
    """Workers that keep the device fed without starving the step of CPU.

    Images are decoded in workers: on a GPU up to 8 per process, leaving one CPU for the main
    loop; on CPU the step itself needs the cores, so a worker only where 4+ CPUs are free. Cached
    features and token ids are read in the main process: a batch is one memory-mapped slice, which
    costs less than passing it between processes.
    """
    if not decodes_images:
        return 0
    cpus = cpus_per_process(runtime)
    if runtime.device.type == "cuda":
        return max(1, min(8, cpus - 1))
    return min(4, cpus // 2) if cpus >= 4 else 0


def loader_settings(data, runtime, dataset) -> dict[str, Any]:
    """DataLoader keyword arguments for `dataset` (one that decodes images gets workers)."""
    decodes_images = getattr(dataset, "image_paths", None) is not None
    workers = data.num_workers if data.num_workers is not None else default_num_workers(runtime, decodes_images)
    settings: dict[str, Any] = {
        "num_workers": int(workers),
        "pin_memory": bool(data.pin_memory) if data.pin_memory is not None else runtime.device.type == "cuda",
    }
    if workers > 0:
        settings["persistent_workers"] = bool(data.persistent_workers) if data.persistent_workers is not None else True
        settings["prefetch_factor"] = int(data.prefetch_factor) if data.prefetch_factor is not None else 4
    return settings
