"""Throughput and peak memory of every training path, measured in one run on this machine.

What is timed (samples/s over `bench.steps` after `bench.warmup` untimed steps):
- `pipeline`: the training DataLoader alone (image decode + transform, token ids, clinical
  features, collation), with the loader settings a run would use;
- `stage1_recompute` / `stage1_cached`: stage-1 training steps end to end (loader included), the
  frozen encoders recomputed every step versus read from the feature cache (its one-off build is
  reported separately as `cache_build`);
- `stage2/<modality>`: stage-2 steps (everything trains) on batches already on the device, for each
  single modality and the full model: the compute the input pipeline has to keep up with;
- `ddp/<n>`: the full model's stage-2 step on n CPU processes (gloo), per-process batch fixed.

Ratios: cache speed-up (stage1_cached / stage1_recompute), pipeline headroom (pipeline /
stage2/all), and DDP scaling. On CUDA also the model FLOPs per sample (counted with
torch.utils.flop_counter) and the model-FLOPs utilisation against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mdfnet_hydra.config import modality_label

log = logging.getLogger(__name__)

CONF = Path(str(resources.files("mdfnet_hydra.conf")))  # the top-level conf/ of a checkout, or an install's copy
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


# ---------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory during a block: CUDA's allocator peak, or the process's resident set sampled
    every few milliseconds on CPU (what the OS must provide, caches and all)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.start_bytes = 0  # at the start of the block: the peak's increase is what the block needed
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


def measure(name: str, step: Callable[[], int], device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """samples/s of `step` (which returns the samples it processed) and the peak memory."""
    for _ in range(warmup):
        step()
    memory = PeakMemory(device)
    with memory.track():
        _sync(device)
        started = time.perf_counter()
        samples = sum(step() for _ in range(steps))
        _sync(device)
        seconds = time.perf_counter() - started
    result = {
        "samples_per_s": samples / seconds,
        "seconds": seconds,
        "samples": samples,
        "peak_memory_gb": memory.peak_bytes / 2**30,
        "memory_increase_gb": (memory.peak_bytes - memory.start_bytes) / 2**30,
        "memory": memory.kind,
    }
    log.info(
        "%-22s %9.1f samples/s  peak %.2f GB (+%.2f GB)",
        name,
        result["samples_per_s"],
        result["peak_memory_gb"],
        result["memory_increase_gb"],
    )
    return result


# ---------------------------------------------------------------- configuration
def bench_config(cfg: DictConfig, image_size: int) -> DictConfig:
    """The training config the benchmark runs: the chosen size's encoders at `image_size`, a
    synthetic dataset of `bench.samples` images of that size, its own cache directory."""
    from mdfnet_hydra.config import BenchSize, load_train_config

    # unresolved, so that data.root follows the sample count and image size set below
    train = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in ("bench", "hydra")}
    run = load_train_config(train)
    b = cfg.bench
    with open_dict(run):
        if b.size == BenchSize.real:
            run.model.vision = OmegaConf.merge(
                run.model.vision, OmegaConf.load(CONF / "model/vision/biomedclip_arch.yaml")
            )
            run.model.text = OmegaConf.merge(
                run.model.text, OmegaConf.load(CONF / "model/text/modernbert_base_arch.yaml")
            )
        run.model.vision.image_size = image_size
        if run.model.vision.open_clip_config is not None:
            run.model.vision.open_clip_config.vision_cfg.image_size = image_size
        run.data.synthetic.num_samples = int(b.samples)
        run.data.synthetic.image_size = image_size
        run.data.small_sample = None
        run.trainer.batch_size = int(b.batch_size)
        run.paths.cache_dir = str(Path(str(b.work_dir)) / "cache")
        run.paths.run_dir = str(b.work_dir)
    return run


def text_length(b: DictConfig) -> Optional[int]:
    from mdfnet_hydra.config import BenchSize

    return b.text_length if b.text_length is not None else (256 if b.size == BenchSize.real else None)


class Setup:
    """A job opened for `modalities` exactly as training opens it (job.open_job), training split only."""

    def __init__(self, cfg: DictConfig, modalities: list[str], runtime, length: Optional[int] = None) -> None:
        from mdfnet_hydra.data.token_cache import TokenIds
        from mdfnet_hydra.job import open_job
        from mdfnet_hydra.runtime import seed_everything

        cfg = cfg.copy()
        cfg.modality.inputs = list(modalities)
        self.cfg, self.modalities, self.runtime = cfg, list(modalities), runtime
        seed_everything(int(cfg.seed))
        self.job = open_job(cfg, splits=("train",))
        self.root, self.prep, self.train, self.collate = (
            self.job.root,
            self.job.prep,
            self.job.datasets["train"],
            self.job.collator,
        )
        if length and self.train.token_ids is not None:  # reports as long as real ones, not the synthetic sentences
            self.train.token_ids = TokenIds.from_lists(
                [ids.repeat(-(-int(length) // len(ids)))[: int(length)].tolist() for ids in self.train.token_ids]
            )

    def model(self, frozen: bool):
        model = self.job.build_model().to(self.runtime.device)
        model.set_encoders_frozen(frozen)
        if self.cfg.trainer.compile:
            model = torch.compile(model)
        return model.train()

    def loader(self, dataset=None):
        from torch.utils.data import DataLoader

        from mdfnet_hydra.data.loading import loader_settings

        dataset = dataset if dataset is not None else self.train
        return DataLoader(
            dataset,
            batch_size=int(self.cfg.trainer.batch_size),
            shuffle=True,
            drop_last=True,
            collate_fn=self.collate,
            **loader_settings(self.cfg.data, self.runtime, dataset),
        )


def loader_choices(setup: Setup) -> dict[str, Any]:
    """The DataLoader settings the benchmark's image pipeline runs with (chosen from the machine)."""
    from mdfnet_hydra.data.loading import loader_settings

    return {k: v for k, v in loader_settings(setup.cfg.data, setup.runtime, setup.train).items() if k != "generator"}


def _cycle(loader) -> Iterator[dict]:
    while True:
        yield from loader


def train_step(model, optimizer, loss_fn, runtime, trainer_cfg: DictConfig) -> Callable[[dict], int]:
    """The trainer's own step (step.TrainingStep: autocast forward, loss, scaled backward, gradient
    accumulation with DDP's no_sync, clipping, the optimizer step) over one batch after another;
    returns the samples each call took."""
    from mdfnet_hydra.step import TrainingStep, to_device

    step = TrainingStep(
        model,
        optimizer,
        loss_fn,
        runtime,
        accumulation=int(trainer_cfg.grad_accum),
        max_grad_norm=trainer_cfg.max_grad_norm,
    )
    index = iter(range(10**12))

    def take(batch: dict) -> int:
        batch = to_device(batch, runtime.device)
        step(batch, next(index))
        return int(batch["targets"].shape[0])

    return take


def _optimizer(model, cfg: DictConfig, phase: str, runtime=None):
    from mdfnet_hydra.optim import build_optimizer

    fused = runtime is not None and runtime.fused_optimizer
    return build_optimizer(getattr(model, "_orig_mod", model), cfg.phases[phase], cfg.optimizer, fused=fused)


def flops_per_sample(model, batch: dict, loss_fn, runtime) -> float:
    """Model FLOPs of one training step (forward + backward) per sample, counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = {k: v.to(runtime.device) for k, v in batch.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        with runtime.autocast():
            logits = getattr(model, "_orig_mod", model)(batch)
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


# ---------------------------------------------------------------- measurements
def bench_pipeline(setup: Setup, steps: int, warmup: int) -> dict[str, Any]:
    batches = _cycle(setup.loader())
    return measure("pipeline", lambda: int(next(batches)["targets"].shape[0]), torch.device("cpu"), steps, warmup)


def bench_stage1(setup: Setup, steps: int, warmup: int) -> dict[str, dict[str, Any]]:
    from mdfnet_hydra.data.feature_cache import cached_datasets
    from mdfnet_hydra.losses import MultiLabelLoss

    rt, cfg = setup.runtime, setup.cfg
    loss_fn = MultiLabelLoss(cfg.loss)
    out: dict[str, dict[str, Any]] = {}
    model = setup.model(frozen=True)
    step = train_step(model, _optimizer(model, cfg, "stage1", rt), loss_fn, rt, cfg.trainer)
    batches = _cycle(setup.loader())
    out["stage1_recompute"] = measure("stage1_recompute", lambda: step(next(batches)), rt.device, steps, warmup)

    shutil.rmtree(Path(str(cfg.paths.cache_dir)), ignore_errors=True)  # time a build, not a reuse
    started = time.perf_counter()
    memory = PeakMemory(rt.device)
    with memory.track():
        cached = cached_datasets(
            getattr(model, "_orig_mod", model), {"train": setup.train}, cfg, rt, setup.prep.pad_id
        )["train"]
    seconds = time.perf_counter() - started
    out["cache_build"] = {
        "samples_per_s": len(setup.train) / seconds,
        "seconds": seconds,
        "samples": len(setup.train),
        "peak_memory_gb": memory.peak_bytes / 2**30,
        "memory": memory.kind,
        "memory_increase_gb": (memory.peak_bytes - memory.start_bytes) / 2**30,
        "bytes_per_sample": sum((c.directory / "features.npy").stat().st_size for c in cached.caches.values())
        / len(setup.train),
    }
    log.info(
        "%-22s %9.1f samples/s  (%.1fs for %d samples, %.0f KB per sample on disk)",
        "cache_build",
        out["cache_build"]["samples_per_s"],
        seconds,
        len(setup.train),
        out["cache_build"]["bytes_per_sample"] / 1024,
    )
    batches = _cycle(setup.loader(cached))
    out["stage1_cached"] = measure("stage1_cached", lambda: step(next(batches)), rt.device, steps, warmup)
    return out


def bench_stage2(setup: Setup, steps: int, warmup: int, flops: bool, estimate_memory: bool = False) -> dict[str, Any]:
    """Stage-2 steps on device-resident batches: the compute the input pipeline must feed."""
    from mdfnet_hydra.losses import MultiLabelLoss

    rt, cfg = setup.runtime, setup.cfg
    loss_fn = MultiLabelLoss(cfg.loss)
    model = setup.model(frozen=False)
    step = train_step(model, _optimizer(model, cfg, "stage2", rt), loss_fn, rt, cfg.trainer)
    loader = iter(setup.loader())
    staged = [
        {k: v.to(rt.device) for k, v in next(loader).items()}
        for _ in range(min(4, len(setup.train) // int(cfg.trainer.batch_size)))
    ]
    counter = iter(range(10**9))
    name = "stage2/" + modality_label(setup.modalities)
    result = measure(name, lambda: step(staged[next(counter) % len(staged)]), rt.device, steps, warmup)
    result["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    if flops:
        result["flops_per_sample"] = flops_per_sample(model, staged[0], loss_fn, rt)
        result["achieved_tflops"] = result["flops_per_sample"] * result["samples_per_s"] / 1e12
    if estimate_memory:
        del model, step, loader  # the trace builds its own model
        result["estimated_memory_gb"] = estimate_step_memory(setup, {k: v.cpu() for k, v in staged[0].items()})
    return result


def _fake_parameters(module: torch.nn.Module, mode) -> None:
    """Swap every parameter and buffer for a fake tensor of the same shape, dtype and grad flag."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = mode.from_tensor(b)


def estimate_step_memory(setup: Setup, batch: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Peak memory (GB, by kind) of stage-2 training steps of `setup`'s model on `batch` under
    `dtype` autocast, traced with fake tensors by torch's MemTracker: shapes and dtypes only,
    nothing computed or allocated. Two steps, so the optimizer state exists at the peak. These are
    the bytes a GPU's allocator would hand out for the step (without the CUDA context, cuBLAS
    workspaces and fragmentation): how a CPU-only machine checks a GPU memory budget."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from mdfnet_hydra.losses import MultiLabelLoss

    cfg = setup.cfg
    model = setup.job.build_model()
    model.set_encoders_frozen(False)
    model.train()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        _fake_parameters(model, mode)
        fake = {k: mode.from_tensor(v) for k, v in batch.items()}
        optimizer = _optimizer(model, cfg, "stage2")
        loss_fn = MultiLabelLoss(cfg.loss)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for _ in range(2):
                with torch.autocast("cpu", dtype=dtype):
                    logits = model(fake)
                loss_fn(logits, fake["targets"], fake["mask"]).total.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    result = {(k if isinstance(k, str) else k.value).lower(): v / 2**30 for k, v in peak.items()}
    result["dtype"] = str(dtype).removeprefix("torch.")
    log.info(
        "%-22s %9s           estimated peak %.2f GB in %s (parameters %.2f, optimizer %.2f, activations %.2f)",
        "stage2 memory",
        "",
        result["total"],
        result["dtype"],
        result["parameter"],
        result["optstate"],
        result["activation"],
    )
    return result


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
            ddp, _optimizer(model, cfg, "stage2", runtime), MultiLabelLoss(cfg.loss), runtime, cfg.trainer
        )
        loader = iter(setup.loader())
        staged = [next(loader) for _ in range(4)]
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


def bench_startup(cfg: DictConfig, work: Path) -> dict[str, float]:
    """The fixed cost of a job in a fresh interpreter: imports, config, opening the dataset
    (manifest, splits, tokenizer, token ids, clinical normaliser) as a job opens it; interpreter start-up
    included in `total_s`."""
    import subprocess
    import sys

    path = work / "startup_config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.benchmarks.startup", str(path)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["total_s"] = time.perf_counter() - started
    log.info(
        "%-22s %9.1f s (imports %.1f s, config %.2f s, dataset open %.2f s)",
        "job start-up",
        result["total_s"],
        result["imports_s"],
        result["config_s"],
        result["dataset_open_s"],
    )
    return result


# ---------------------------------------------------------------- the whole benchmark
def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    from mdfnet_hydra.config import BenchMeasure, BenchSize
    from mdfnet_hydra.runtime import Runtime

    b = cfg.bench
    size_name = BenchSize(b.size).value
    work = Path(str(b.work_dir)).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes = list(b.image_sizes) if b.image_sizes else ([224] if size_name == "real" else [64, 224])
    runtime = Runtime.from_config(cfg.trainer)
    results: dict[str, Any] = {
        "device": runtime.describe(),
        "size": size_name,
        "batch_size": int(b.batch_size),
        "steps": int(b.steps),
        "torch": torch.__version__,
        "cpus": runtime.machine.cpus,
        "compile": bool(cfg.trainer.compile),
        "memory": PeakMemory(runtime.device).kind,
        "by_image_size": {},
    }
    peak = peak_tflops(runtime.device, b.peak_tflops)
    measure = {BenchMeasure(m).value for m in b.measure}
    if "startup" in measure:
        results["startup"] = bench_startup(bench_config(cfg, int(sizes[0])), work)
    for size in sizes:
        run_cfg = bench_config(cfg, int(size))
        log.info("--- %d px, %s encoders, batch %d, %s", size, size_name, b.batch_size, runtime.describe())
        entry: dict[str, Any] = {}
        full = Setup(run_cfg, ["vision", "text", "clinical"], runtime, text_length(b))
        results.setdefault("loader", loader_choices(full))
        if "pipeline" in measure:
            entry["pipeline"] = bench_pipeline(full, int(b.steps), int(b.warmup))
        if "stage1" in measure:
            entry.update(bench_stage1(full, int(b.steps), int(b.warmup)))
        for modalities in (["vision"], ["text"], ["clinical"], ["vision", "text", "clinical"]):
            key = "stage2/" + modality_label(modalities)
            if key.replace("/", "_") not in measure:
                continue
            every = key == "stage2/all"
            setup = full if every else Setup(run_cfg, modalities, runtime, text_length(b))
            entry[key] = bench_stage2(
                setup, int(b.steps), int(b.warmup), flops=every, estimate_memory=bool(b.estimate_memory) and every
            )
        if peak and "achieved_tflops" in entry.get("stage2/all", {}):
            entry["stage2/all"]["mfu"] = entry["stage2/all"]["achieved_tflops"] / peak
        entry["ratios"] = ratios(entry)
        results["by_image_size"][str(size)] = entry
    if b.ddp_workers and runtime.device.type == "cpu":
        ddp_cfg = bench_config(cfg, int(sizes[0]))
        ddp = {str(n): bench_ddp(ddp_cfg, int(n), text_length(b), int(b.steps), int(b.warmup)) for n in b.ddp_workers}
        first = str(b.ddp_workers[0])
        results["ddp_cpu"] = {
            **ddp,
            "scaling": {n: r["samples_per_s"] / ddp[first]["samples_per_s"] for n, r in ddp.items()},
        }
    results["peak_bf16_tflops"] = peak
    return results


def ratios(entry: dict[str, Any]) -> dict[str, float]:
    """The ratios whose two measurements were both taken."""

    def rate(name: str) -> Optional[float]:
        return entry[name]["samples_per_s"] if name in entry else None

    pairs = {
        "cache_speedup_stage1": ("stage1_cached", "stage1_recompute"),
        "pipeline_over_stage2": ("pipeline", "stage2/all"),
        **{f"all_over_{m}": ("stage2/all", f"stage2/{m}") for m in ("vision", "text", "clinical")},
    }
    return {name: rate(a) / rate(b) for name, (a, b) in pairs.items() if rate(a) and rate(b)}


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"mdfnet-hydra benchmark: {results['device']}, {results['size']} encoders, batch {results['batch_size']}",
        f"input pipeline: {results.get('loader')}",
        f"{'measurement':<22} {'px':>4} {'samples/s':>11} {'peak GB':>8} {'+GB':>6}  notes",
        f"(peak memory: {'CUDA max allocated' if results['memory'] == 'cuda_max_allocated' else 'process resident set'}; "
        "+GB: its increase during the measurement)",
    ]
    for size, entry in results["by_image_size"].items():
        for name, r in entry.items():
            if name == "ratios":
                continue
            notes = []
            if "flops_per_sample" in r:
                notes.append(f"{r['flops_per_sample'] / 1e9:.1f} GFLOP/sample, {r['achieved_tflops']:.2f} TFLOP/s")
            if "mfu" in r:
                notes.append(f"MFU {100 * r['mfu']:.1f}%")
            if "bytes_per_sample" in r:
                notes.append(f"{r['bytes_per_sample'] / 1024:.0f} KB/sample cached")
            if "parameters_m" in r:
                notes.append(f"{r['parameters_m']:.1f}M params")
            if "estimated_memory_gb" in r:
                est = r["estimated_memory_gb"]
                notes.append(
                    f"estimated {est['dtype']} peak {est['total']:.2f} GB (activations {est['activation']:.2f})"
                )
            lines.append(
                f"{name:<22} {size:>4} {r['samples_per_s']:>11.1f} {r['peak_memory_gb']:>8.2f} "
                f"{r.get('memory_increase_gb', 0):>6.2f}  {'; '.join(notes)}"
            )
        shown = {
            "cache_speedup_stage1": "stage 1 cached / recomputed {:.1f}x",
            "pipeline_over_stage2": "input pipeline / stage-2 step {:.1f}x",
            "all_over_vision": "full model / vision {:.2f}",
            "all_over_text": "/ text {:.2f}",
            "all_over_clinical": "/ clinical {:.2f}",
        }
        if entry["ratios"]:
            lines.append(
                f"  ratios at {size} px: "
                + ", ".join(text.format(entry["ratios"][k]) for k, text in shown.items() if k in entry["ratios"])
            )
    if "startup" in results:
        st = results["startup"]
        lines.append(
            f"job start-up {st['total_s']:.1f} s: imports {st['imports_s']:.1f} s, config {st['config_s']:.2f} s, "
            f"dataset open {st['dataset_open_s']:.2f} s"
        )
    if "ddp_cpu" in results:
        scaling = ", ".join(
            f"{n} workers {results['ddp_cpu'][n]['samples_per_s']:.1f} samples/s ({s:.2f}x)"
            for n, s in results["ddp_cpu"]["scaling"].items()
        )
        lines.append(f"DDP on CPU (gloo, stage-2 step, {results['batch_size']} per worker): {scaling}")
    return "\n".join(lines)


def write(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path
