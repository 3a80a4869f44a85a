"""DataLoader settings from the machine: worker processes, pinned memory, persistent workers and
prefetch, each overridable in `data.*` (null = chosen here from `runtime.machine`)."""

from __future__ import annotations

import multiprocessing
import sys
from typing import Any, Optional

import torch


def default_num_workers(runtime, decodes_images: bool) -> int:
    """Workers that keep the device fed without starving the step of CPU.

    Images are decoded in workers: for a GPU up to 8 per process, leaving one CPU for the main
    loop; on CPU the step itself needs the cores, so a worker only where 4+ CPUs are free. Cached
    features and token ids are read in the main process: a batch is one memory-mapped slice, which
    costs less than passing it between processes.
    """
    if not decodes_images:
        return 0
    cpus = runtime.machine.cpus_per_process()
    if runtime.target == "cuda":
        return max(1, min(8, cpus - 1))
    return min(4, cpus // 2) if cpus >= 4 else 0


def loader_settings(data, runtime, dataset, *, persistent: bool = True, seed: Optional[int] = None) -> dict[str, Any]:
    """DataLoader keyword arguments for `dataset` (one that decodes images gets workers).

    `persistent=False` for a loader iterated once (the test split, a cache build): persistent
    workers would only hold memory. The loader gets its own generator, so the seed it draws for
    its workers never comes from the global RNG: dropout draws the same numbers whether a run
    has 0, 2 or 8 workers, persistent or not.
    """
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    if getattr(dataset, "resident_device", None) is not None:  # batches gathered on the device (feature_cache.py)
        return {"num_workers": 0, "pin_memory": False, "generator": generator}
    decodes_images = getattr(dataset, "image_paths", None) is not None
    workers = data.num_workers if data.num_workers is not None else default_num_workers(runtime, decodes_images)
    settings: dict[str, Any] = {
        "num_workers": int(workers),
        # pinned host memory makes host-to-GPU copies asynchronous (the trainer copies non_blocking)
        "pin_memory": bool(data.pin_memory) if data.pin_memory is not None else runtime.target == "cuda",
        "generator": generator,
    }
    if workers > 0:
        keep = bool(data.persistent_workers) if data.persistent_workers is not None else True
        settings["persistent_workers"] = keep and persistent
        settings["prefetch_factor"] = int(data.prefetch_factor) if data.prefetch_factor is not None else 4
        settings["multiprocessing_context"] = worker_start_method(data)
    return settings


def worker_start_method(data) -> str:
    """`data.worker_start`, or fork where the OS has it: workers start in milliseconds sharing the
    parent's imports and memory maps. The platform default is not used because it depends on how
    this process started (a rank spawned by torch's elastic agent inherits `spawn`, so each of its
    workers would re-import torch and the encoders: 30 s per loader start on 2 CPUs) and on the
    Python version (3.14 moves Linux to forkserver). Elsewhere (macOS: fork is unsafe there) the
    platform's default."""
    if data.worker_start is not None:
        return str(getattr(data.worker_start, "value", data.worker_start))
    if sys.platform.startswith("linux"):
        return "fork"
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def describe_loader(loader) -> str:
    """The DataLoader choices a log reader needs to reproduce a run's input pipeline."""
    held = getattr(loader.dataset, "resident_device", None)
    if held is not None:
        return f"gathered on {held} from the feature cache held there (no workers)"
    if loader.num_workers == 0:
        return "in the main process (0 workers)"
    pinned = "unpinned memory"
    if loader.pin_memory:  # torch pins only where an accelerator is (a described CUDA machine on a CPU has none)
        pinned = "pinned memory" if torch.accelerator.is_available() else "pin_memory asked, no accelerator: not pinned"
    context = loader.multiprocessing_context
    start = context.get_start_method() if context is not None else "default start"
    return (
        f"{loader.num_workers} workers ({'persistent' if loader.persistent_workers else 'restarted each epoch'}, "
        f"prefetch {loader.prefetch_factor}, {start}), {pinned}"
    )
