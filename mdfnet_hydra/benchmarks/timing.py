"""The timing harness of the benchmark: samples/s of a step over timed calls after untimed warm-up
calls, the peak memory meanwhile (CUDA's allocator peak, or the process's resident set on CPU), and
the model FLOPs and GPU peak that model-FLOPs utilisation is computed from."""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

log = logging.getLogger(__name__)


# dense bf16 tensor-core peaks (TFLOP/s) for the model-FLOPs utilisation
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


class PeakMemory:
    """Peak memory during a block: CUDA's allocator peak, or the process's resident set sampled
    every few milliseconds on CPU (what the OS must provide, caches and all)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.start_bytes = 0  # at the start of the block: the peak's increase is what the block needed
        self.peak_reserved_bytes: Optional[int] = None  # CUDA only
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    @contextmanager
    def track(self) -> Iterator["PeakMemory"]:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            # what the caching allocator held, CUDA graphs' private pools included: what the GPU must have
            self.peak_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
            return
        self.peak_bytes = self.start_bytes = self._rss()
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            self._stop.set()
            sampler.join()

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_rss"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str,
    step: Callable[[], int],
    device: torch.device,
    steps: int,
    warmup: int,
    profile_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """samples/s of `step` (which returns the samples it processed) and the peak memory; also the
    first (untimed) call's seconds: what compiling costs under trainer.compile. The peak covers the
    warm-up calls too: CUDA graphs allocate their memory pool while they are recorded there."""
    first_s = None
    memory = PeakMemory(device)
    with memory.track():
        for i in range(warmup):
            if i == 0:
                _sync(device)
                began = time.perf_counter()
            step()
            if i == 0:
                _sync(device)
                first_s = time.perf_counter() - began
        _sync(device)
        compiled_before = _graphs_compiled()
        started = time.perf_counter()
        samples = sum(step() for _ in range(steps))
        _sync(device)
        seconds = time.perf_counter() - started
        compiled_while_timed = _graphs_compiled() - compiled_before
    result = {
        "samples_per_s": samples / seconds,
        "seconds": seconds,
        "samples": samples,
        "peak_memory_gb": memory.peak_bytes / 2**30,
        "memory_increase_gb": (memory.peak_bytes - memory.start_bytes) / 2**30,
        "memory": memory.kind,
        "peak_reserved_gb": None if memory.peak_reserved_bytes is None else memory.peak_reserved_bytes / 2**30,
        "first_step_s": first_s,
        # graphs torch compiled during the timed steps (a shape the warm-up did not show): their
        # compile time is in `seconds`, so the rate understates the step
        "graphs_compiled_while_timed": compiled_while_timed,
    }
    if compiled_while_timed:
        log.warning(
            "%s: torch compiled %d graph(s) during the timed steps (input shapes the %d warm-up step(s) did "
            "not show); the rate includes compile time: raise bench.warmup",
            name,
            compiled_while_timed,
            warmup,
        )
    log.info(
        "%-22s %9.1f samples/s  peak %.2f GB (+%.2f GB)",
        name,
        result["samples_per_s"],
        result["peak_memory_gb"],
        result["memory_increase_gb"],
    )
    if profile_dir is not None:
        result["profile"] = profile_steps(name, step, device, steps, Path(profile_dir))
    return result


def profile_steps(name: str, step: Callable[[], int], device: torch.device, steps: int, out: Path) -> dict[str, Any]:
    """`steps` more calls of `step` under torch.profiler: the wall, host (self CPU, all ops) and
    device (self CUDA) milliseconds per call, and the tables of the ops that take them in
    out/profile_<name>.txt. Where a step spends its time: waiting on the GPU or feeding it."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    path = out / f"profile_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.txt"
    tables = [f"{name}: {steps} steps under torch.profiler, {1000 * wall / steps:.3f} ms per step (wall)"]
    tables.append("by self CPU time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=25))
    if cuda:
        tables.append("by self device time:\n" + events.table(sort_by="self_device_time_total", row_limit=25))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables) + "\n")
    per_step = {
        "wall_ms_per_step": 1000 * wall / steps,
        **time_split(events, steps),
        **launches(prof.events(), steps),
        "table": str(path),
    }
    log.info(
        "%-22s profiled: %.3f ms per step wall, %.3f ms host work, %.3f ms host waiting%s; %.1f operators "
        "outside compiled graphs per step",
        name,
        per_step["wall_ms_per_step"],
        per_step["host_ms_per_step"],
        per_step["host_wait_ms_per_step"],
        f", {per_step['device_ms_per_step']:.3f} ms of GPU kernels" if cuda else "",
        per_step["eager_ops_per_step"],
    )
    return per_step


# a compiled graph's run ("CompiledFunctionBackward" too); not torch's "Torch-Compiled Region", which
# also spans the eager code between the graphs of a frame that breaks
COMPILED_REGIONS = ("CompiledFxGraph", "CompiledFunction")
# operators that only view or allocate (no kernel): not counted
NO_KERNEL = frozenset(
    f"aten::{name}"
    for name in (
        "detach", "alias", "view", "_unsafe_view", "_reshape_alias", "view_as", "slice", "select", "narrow",
        "expand", "expand_as", "t", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "unflatten",
        "split", "split_with_sizes", "chunk", "unbind", "as_strided", "resolve_conj", "resolve_neg", "empty",
        "empty_strided", "empty_like", "lift_fresh",
    )
)  # fmt: skip
# operators that compute only through the operators they call (a copy, a cast): counted when one does
PASS_THROUGH = frozenset({"aten::to", "aten::contiguous", "aten::reshape", "aten::type_as"})
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def launches(events, steps: int) -> dict[str, Any]:
    """Per step: the operators computing outside compiled graphs (top-level `aten::` ops, not inside
    another op nor a compiled region, views and allocations left out: on a GPU each launches its
    kernels one by one; the same count on any machine) with the commonest, and on a GPU the kernel
    launches and CUDA graph replays the host issued."""
    outside: Counter[str] = Counter()
    for event in events:
        if not event.name.startswith("aten::") or event.name in NO_KERNEL:
            continue
        if event.name in PASS_THROUGH and not _computes_below(event):
            continue  # already the dtype, device or layout asked for (or only a view): nothing ran
        parent = event.cpu_parent
        if parent is not None and parent.name.startswith("aten::"):
            continue  # called by another operator
        while parent is not None and not any(region in parent.name for region in COMPILED_REGIONS):
            parent = parent.cpu_parent
        if parent is None:
            outside[event.name] += 1
    names = Counter(event.name for event in events)  # (the host's CUDA API calls, on a GPU)
    kernels = sum(names[n] for n in KERNEL_LAUNCHES)
    graphs = names["cudaGraphLaunch"]
    return {
        "eager_ops_per_step": sum(outside.values()) / steps,
        "eager_ops_top": {k: v / steps for k, v in outside.most_common(10)},
        "kernel_launches_per_step": kernels / steps if kernels or graphs else None,
        "graph_launches_per_step": graphs / steps if kernels or graphs else None,
    }


def _computes_below(event) -> bool:
    """Whether an operator called, directly or further down, one that is not a view or allocation."""
    return any(
        child.name.startswith("aten::")
        and (child.name not in NO_KERNEL and child.name not in PASS_THROUGH or _computes_below(child))
        for child in event.cpu_children
    )


def time_split(events, steps: int) -> dict[str, Optional[float]]:
    """Milliseconds per step of host work, of the host waiting for the GPU (synchronisations), and
    of GPU kernels. Torch lists each kernel as an event of its own and also charges its time to the
    operator that launched it, so device time counts only the kernels (and no annotation ranges)."""
    from torch.autograd import DeviceType

    host = [e for e in events if e.device_type == DeviceType.CPU and not e.is_user_annotation]
    waiting = sum(e.self_cpu_time_total for e in host if "Synchronize" in e.key)
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    return {
        "host_ms_per_step": (sum(e.self_cpu_time_total for e in host) - waiting) / steps / 1000,
        "host_wait_ms_per_step": waiting / steps / 1000,
        "device_ms_per_step": sum(e.self_device_time_total for e in kernels) / steps / 1000 if kernels else None,
    }


def _graphs_compiled() -> int:
    """Graphs torch has compiled in this process (0 where nothing compiled: an eager benchmark
    does not import torch's compiler, 0.8 s, to count none)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from mdfnet_hydra.compiling import compile_counts

    return compile_counts()["graphs"]


def cycle(loader) -> Iterator[dict]:
    """The loader's batches, pass after pass (a loader without a batch is an error, not a hang)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"the loader over {len(loader.dataset)} samples yields no batch")


def flops_per_sample(model, batch: dict, loss_fn, runtime) -> float:
    """Model FLOPs of one training step (forward + backward) per sample, counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = {k: v.to(runtime.device) for k, v in batch.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        with runtime.autocast():
            logits = model(batch)
        loss_fn(logits, batch["targets"], batch["mask"]).total.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["targets"].shape[0]


def peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
