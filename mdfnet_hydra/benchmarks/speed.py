"""Throughput and peak memory of every training path, measured in one run on this machine.

What is timed (samples/s over `bench.steps` after `bench.warmup` untimed steps):
- `pipeline`: the training DataLoader alone (image decode + transform, token ids, clinical
  features, collation), with the loader settings a run would use;
- `stage1_recompute` / `stage1_cached`: stage-1 training steps end to end (loader included), the
  frozen encoders recomputed every step versus read from the feature cache (its one-off build is
  reported separately as `cache_build`; held in GPU memory where the trainer would hold it);
  `bench.measure=[stage1_cached]` leaves out the recomputing steps (and their compile);
- `stage2/<modality>`: stage-2 steps (everything trains) on batches already on the device, for each
  single modality and the full model: the compute the input pipeline has to keep up with;
- `ddp/<n>`: the full model's stage-2 step on n CPU processes (gloo), per-process batch fixed;
- `text_tokens` (not timed): the training reports' real-token share under each padding (tokens.py).

Under `trainer.compile=true` the step compiles as the trainer's does (compiling.py) and each
measurement's first untimed step, its compile, is reported as `first_step_s`.

Ratios: cache speed-up (stage1_cached / stage1_recompute), pipeline headroom (pipeline /
stage2/all), and DDP scaling. On CUDA also the model FLOPs per sample (counted with
torch.utils.flop_counter) and the model-FLOPs utilisation against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from mdfnet_hydra.benchmarks.ddp import bench_ddp
from mdfnet_hydra.benchmarks.memory import estimate_step_memory
from mdfnet_hydra.benchmarks.startup import bench_startup
from mdfnet_hydra.benchmarks.timing import PeakMemory, cycle, flops_per_sample, measure, peak_tflops
from mdfnet_hydra.benchmarks.tokens import bench_text_tokens
from mdfnet_hydra.benchmarks.workload import (
    Setup,
    bench_config,
    loader_choices,
    optimizer_for,
    text_length,
    train_step,
    whole_windows,
)
from mdfnet_hydra.config import modality_label

log = logging.getLogger(__name__)


def bench_pipeline(setup: Setup, steps: int, warmup: int) -> dict[str, Any]:
    batches = cycle(setup.loader())
    return measure(
        "pipeline",
        lambda: int(next(batches)["targets"].shape[0]),
        torch.device("cpu"),
        steps,
        warmup,
        setup.profile_dir,
    )


def bench_stage1(setup: Setup, steps: int, warmup: int, recompute: bool = True) -> dict[str, dict[str, Any]]:
    from mdfnet_hydra.data.feature_cache import cached_datasets, hold_on_device
    from mdfnet_hydra.losses import MultiLabelLoss

    rt, cfg = setup.runtime, setup.cfg
    loss_fn = MultiLabelLoss(cfg.loss)
    out: dict[str, dict[str, Any]] = {}
    model = setup.model(frozen=True)

    def stage1_step():
        """Each measurement its own step: a compiled step's graph limit (one per length bucket)
        holds the batch shapes of one kind of input, images or cached features."""
        return train_step(
            model, optimizer_for(model, cfg, "stage1", rt), loss_fn, rt, cfg.trainer, setup.compile_plan()
        )

    if recompute:
        step = stage1_step()
        batches = cycle(setup.loader())
        out["stage1_recompute"] = measure(
            "stage1_recompute", lambda: step(next(batches)), rt.device, steps, warmup, setup.profile_dir
        )

    shutil.rmtree(Path(str(cfg.paths.cache_dir)), ignore_errors=True)  # time a build, not a reuse
    started = time.perf_counter()
    memory = PeakMemory(rt.device)
    with memory.track():  # the build alone; holding it in the device's memory is timed below
        cached = cached_datasets(model, {"train": setup.train}, cfg, rt, setup.prep.pad_id, hold=False)["train"]
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
    rows = torch.randperm(len(cached), generator=torch.Generator().manual_seed(0))[: int(cfg.trainer.batch_size)]
    mapped = cached.__getitems__(rows.tolist())
    started = time.perf_counter()
    hold_on_device({"train": cached}, cfg.data.feature_cache_on_device, rt)
    out["cache_build"]["hold_s"] = time.perf_counter() - started  # the copy into the device's memory, if any
    if cached.resident_device is not None:  # the batch gathered there is the batch read from the map
        held = cached.__getitems__(rows.tolist())
        out["cache_build"]["held_batch_matches_mapped"] = sorted(held) == sorted(mapped) and all(
            torch.equal(held[k].cpu(), mapped[k]) for k in mapped
        )
    batches = cycle(setup.loader(cached))
    step = stage1_step()
    out["stage1_cached"] = measure(
        "stage1_cached", lambda: step(next(batches)), rt.device, steps, warmup, setup.profile_dir
    )
    out["stage1_cached"]["held_on"] = None if cached.resident_device is None else str(cached.resident_device)
    return out


def bench_stage2(setup: Setup, steps: int, warmup: int, flops: bool, estimate_memory: bool = False) -> dict[str, Any]:
    """Stage-2 steps on device-resident batches: the compute the input pipeline must feed."""
    from mdfnet_hydra.losses import MultiLabelLoss

    rt, cfg = setup.runtime, setup.cfg
    loss_fn = MultiLabelLoss(cfg.loss)
    model = setup.model(frozen=False)
    step = train_step(model, optimizer_for(model, cfg, "stage2", rt), loss_fn, rt, cfg.trainer, setup.compile_plan())
    batches = min(4, len(setup.train) // int(cfg.trainer.batch_size))  # (Setup holds at least one)
    staged = [{k: v.to(rt.device) for k, v in batch.items()} for batch in setup.batches(batches)]
    counter = iter(range(10**9))
    name = "stage2/" + modality_label(setup.modalities)
    if cfg.trainer.compile:  # every staged batch's shape compiles before the timed steps
        warmup = whole_windows(max(warmup, len(staged)), cfg.trainer.grad_accum)
    result = measure(
        name, lambda: step(staged[next(counter) % len(staged)]), rt.device, steps, warmup, setup.profile_dir
    )
    result["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    if flops:
        result["flops_per_sample"] = flops_per_sample(model, staged[0], loss_fn, rt)
        result["achieved_tflops"] = result["flops_per_sample"] * result["samples_per_s"] / 1e12
    if estimate_memory:
        del model, step  # the trace builds its own model
        result["estimated_memory_gb"] = estimate_step_memory(setup, {k: v.cpu() for k, v in staged[0].items()})
    return result


def check_benchmark(cfg: DictConfig, sizes: list[int]) -> None:
    """Refuse at start, in one line, what the benchmark cannot measure: its own options, and each
    training config it runs as training would (`validate_config`: buckets, compile modes, the
    machine description), so a number is never measured on a config the trainer refuses."""
    from omegaconf import open_dict

    from mdfnet_hydra.config import Modality, bench_problems, refuse, validate_config

    problems = bench_problems(cfg)
    for size in sizes:
        run = bench_config(cfg, int(size))
        length, longest = text_length(cfg.bench), int(run.model.text.max_length)
        if length is not None and int(length) > longest:
            problems.append(
                f"bench.text_length={length} is longer than the text encoder takes (model.text.max_length "
                f"{longest}): reports are cut there"
            )
        if problems:
            break
        with open_dict(run):  # the modalities the chosen measurements run (a text-only rule need not hold
            run.modality.inputs = [Modality(m) for m in measured_modalities(cfg)]  # for a vision step)
        validate_config(run)
    refuse(problems)


# the measurements that run one modality; every other step measurement runs all three
SINGLE_MODALITY = {"stage2_vision": "vision", "stage2_text": "text", "stage2_clinical": "clinical"}


def measured_modalities(cfg: DictConfig) -> list[str]:
    """The modalities the chosen `bench.measure` runs (all three where none runs a model)."""
    from mdfnet_hydra.config import BenchMeasure

    measures = {BenchMeasure(m).value for m in cfg.bench.measure} - {"text_tokens"}
    if not measures or measures - set(SINGLE_MODALITY):
        return ["vision", "text", "clinical"]
    return [m for m in ("vision", "text", "clinical") if m in {SINGLE_MODALITY[x] for x in measures}]


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    from mdfnet_hydra.config import BenchMeasure, BenchSize
    from mdfnet_hydra.runtime import Runtime

    b = cfg.bench
    size_name = BenchSize(b.size).value
    sizes = list(b.image_sizes) if b.image_sizes else ([224] if size_name == "real" else [64, 224])
    check_benchmark(cfg, sizes)
    work = Path(str(b.work_dir)).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.from_config(cfg.trainer)
    accumulation = int(cfg.trainer.grad_accum)
    steps, warmup = whole_windows(b.steps, accumulation), whole_windows(b.warmup, accumulation)
    results: dict[str, Any] = {
        "device": runtime.describe(),
        "size": size_name,
        "batch_size": int(b.batch_size),
        "steps": steps,
        # micro-batches per optimizer step, as the trainer runs them: `steps` and the warm-up are
        # whole windows
        "grad_accum": accumulation,
        "torch": torch.__version__,
        "cpus": runtime.machine.cpus,
        "compile": bool(cfg.trainer.compile),
        "compile_mode": str(getattr(cfg.trainer.compile_mode, "value", cfg.trainer.compile_mode)),
        "compile_loss": bool(cfg.trainer.compile_loss),
        "length_buckets": list(cfg.model.text.length_buckets),
        # token ids per report, all real; null: the data's own reports, padded to the buckets
        "text_length": text_length(b),
        "memory": PeakMemory(runtime.device).kind,
        "by_image_size": {},
    }
    peak = peak_tflops(runtime.device, b.peak_tflops)
    profile_dir = Path(str(b.output)).parent if b.profile else None  # profile_<measurement>.txt beside the JSON
    measure = {BenchMeasure(m).value for m in b.measure}
    if "startup" in measure:
        results["startup"] = bench_startup(bench_config(cfg, int(sizes[0])), work)
    if "text_tokens" in measure:
        results["text_tokens"] = bench_text_tokens(cfg)
    sized = {"pipeline", "stage1", "stage1_cached", "stage2_vision", "stage2_text", "stage2_clinical", "stage2_all"}
    for size in sizes if measure & sized else []:  # (text_tokens reads the job's own data, any data)
        run_cfg = bench_config(cfg, int(size))
        log.info("--- %d px, %s encoders, batch %d, %s", size, size_name, b.batch_size, runtime.describe())
        entry: dict[str, Any] = {}
        full = Setup(run_cfg, ["vision", "text", "clinical"], runtime, text_length(b), profile_dir)
        results.setdefault("loader", loader_choices(full))
        if "pipeline" in measure:
            entry["pipeline"] = bench_pipeline(full, int(b.steps), int(b.warmup))
        if measure & {"stage1", "stage1_cached"}:
            entry.update(bench_stage1(full, steps, warmup, recompute="stage1" in measure))
        for modalities in (["vision"], ["text"], ["clinical"], ["vision", "text", "clinical"]):
            key = "stage2/" + modality_label(modalities)
            if key.replace("/", "_") not in measure:
                continue
            every = key == "stage2/all"
            setup = full if every else Setup(run_cfg, modalities, runtime, text_length(b), profile_dir)
            entry[key] = bench_stage2(
                setup, steps, warmup, flops=every, estimate_memory=bool(b.estimate_memory) and every
            )
        if peak and "achieved_tflops" in entry.get("stage2/all", {}):
            entry["stage2/all"]["mfu"] = entry["stage2/all"]["achieved_tflops"] / peak
        entry["ratios"] = ratios(entry)
        results["by_image_size"][str(size)] = entry
    if "ddp" in measure and b.ddp_workers and runtime.device.type == "cpu":
        ddp_cfg = bench_config(cfg, int(sizes[0]))
        ddp = {str(n): bench_ddp(ddp_cfg, int(n), text_length(b), steps, warmup) for n in b.ddp_workers}
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
        "cache_build_over_recompute": ("cache_build", "stage1_recompute"),
        "pipeline_over_stage2": ("pipeline", "stage2/all"),
        **{f"all_over_{m}": ("stage2/all", f"stage2/{m}") for m in ("vision", "text", "clinical")},
    }
    return {name: rate(a) / rate(b) for name, (a, b) in pairs.items() if rate(a) and rate(b)}


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"mdfnet-hydra benchmark: {results['device']}, {results['size']} encoders, batch {results['batch_size']}, "
        f"{results['grad_accum']} per optimizer step (trainer.grad_accum)"
    ]
    if results["by_image_size"]:  # the per-size table's header, only above rows (text_tokens alone has none)
        memory = "CUDA max allocated" if results["memory"] == "cuda_max_allocated" else "process resident set"
        lines += [
            f"data loading: {results['loader']}",
            f"{'measurement':<22} {'px':>4} {'samples/s':>11} {'peak GB':>8} {'+GB':>6}  notes",
            f"(peak memory: {memory}; +GB: its increase during the measurement)",
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
                notes.append(f"{r['bytes_per_sample'] / 1024:.0f} KB/sample cached, {r['samples']} samples")
            if r.get("held_on"):
                notes.append(f"cache held on {r['held_on']}")
            if results.get("compile") and r.get("first_step_s") is not None and name != "pipeline":
                notes.append(f"first step (compiling) {r['first_step_s']:.1f} s")
            if r.get("graphs_compiled_while_timed"):
                notes.append(f"COMPILED {r['graphs_compiled_while_timed']} graph(s) while timed: raise bench.warmup")
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
            "cache_build_over_recompute": "cache build / recomputing step {:.2f}x per sample",
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
    if "text_tokens" in results:
        t = results["text_tokens"]
        buckets = (
            f", to buckets {t['buckets']} {100 * t['real_share_buckets']:.0f}% ({t['shapes_buckets']} shapes)"
            if t["buckets"]
            else ""
        )
        lines.append(
            f"report tokens ({t['reports']} training reports): mean {t['tokens_mean']:.0f}, p95 {t['tokens_p95']:.0f}, "
            f"max {t['tokens_max']} of {t['max_length']}; real share padded to max_length "
            f"{100 * t['real_share_max_length']:.0f}%, to the batch's longest {100 * t['real_share_batch_longest']:.0f}% "
            f"({t['shapes_batch_longest']} shapes){buckets}"
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
