"""`python -m mdfnet_hydra.bench` in a small configuration, so that it cannot rot (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

MEASUREMENTS = (
    "pipeline",
    "stage1_recompute",
    "cache_build",
    "stage1_cached",
    "stage2/vision",
    "stage2/text",
    "stage2/clinical",
    "stage2/all",
)


def bench(*overrides: str) -> subprocess.CompletedProcess:
    """`python -m mdfnet_hydra.bench` with these overrides, offline, from the checkout."""
    return subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.bench", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow  # tens of seconds; CI's slow suite runs it
def test_benchmark_measures_every_path_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = bench(
        f"paths.root={tmp_path}",
        f"bench.output={out}",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.samples=96",
        "bench.image_sizes=[32]",
        "bench.ddp_workers=[1,2]",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(out.read_text())
    entry = results["by_image_size"]["32"]
    for name in MEASUREMENTS:
        assert entry[name]["samples_per_s"] > 0 and entry[name]["peak_memory_gb"] > 0, name
    assert entry["stage2/all"]["flops_per_sample"] > entry["stage2/clinical"].get("flops_per_sample", 0)
    estimate = entry["stage2/all"]["estimated_memory_gb"]
    assert estimate["dtype"] == "bfloat16" and estimate["total"] > estimate["parameter"] > 0
    ratios = entry["ratios"]
    assert (
        ratios["cache_speedup_stage1"]
        == entry["stage1_cached"]["samples_per_s"] / entry["stage1_recompute"]["samples_per_s"]
    )
    assert ratios["pipeline_over_stage2"] == entry["pipeline"]["samples_per_s"] / entry["stage2/all"]["samples_per_s"]
    assert entry["cache_build"]["bytes_per_sample"] > 0
    assert ratios["cache_build_over_recompute"] == (
        entry["cache_build"]["samples_per_s"] / entry["stage1_recompute"]["samples_per_s"]
    )
    assert entry["stage1_cached"]["held_on"] is None  # auto holds the cache in memory on a CUDA device only
    assert set(results["ddp_cpu"]["scaling"]) == {"1", "2"} and results["ddp_cpu"]["scaling"]["1"] == 1.0
    assert results["ddp_cpu"]["2"]["workers"] == 2
    assert all(results["startup"][k] > 0 for k in ("imports_s", "config_s", "dataset_open_s", "total_s"))
    for line in ("stage1_cached", "ratios at 32 px", "DDP on CPU", "job start-up", "estimated bfloat16 peak"):
        assert line in result.stdout


@pytest.mark.slow  # two inductor compiles on the CPU
def test_a_compiled_stage1_measures_recomputing_and_cached_steps_with_one_bucket(tmp_path):
    """One length bucket allows one graph per step: the recomputing step (images in) and the cached
    step (features in) are two steps, each with its own graph, not one step asked for a second."""
    out = tmp_path / "bench.json"
    result = bench(
        f"paths.root={tmp_path}",
        f"bench.output={out}",
        "bench.measure=[stage1]",
        "trainer.compile=true",
        "model.text.length_buckets=[128]",
        "bench.image_sizes=[32]",
        "bench.samples=96",
        "bench.steps=2",
        "bench.warmup=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    entry = json.loads(out.read_text())["by_image_size"]["32"]
    for name in ("stage1_recompute", "stage1_cached"):
        assert entry[name]["samples_per_s"] > 0 and entry[name]["first_step_s"] > 0
        assert entry[name]["graphs_compiled_while_timed"] == 0


@pytest.mark.slow
def test_memory_estimate_counts_weights_optimizer_state_and_batch_scaled_activations(tmp_path):
    """The fake-tensor trace behind the GPU memory figure: weights and AdamW's two moments exactly,
    activations growing with the batch (64 vs 32 samples at 64 px, where they dominate the peak)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from mdfnet_hydra.benchmarks.memory import estimate_step_memory
    from mdfnet_hydra.benchmarks.workload import Setup, bench_config
    from mdfnet_hydra.runtime import Runtime

    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("bench", overrides=[f"paths.root={tmp_path}", "bench.samples=160", "bench.batch_size=64"])
    run_cfg = bench_config(cfg, 64)
    setup = Setup(run_cfg, ["vision", "text", "clinical"], Runtime.from_config(run_cfg.trainer))
    batch = next(iter(setup.loader()))
    weights_gb = sum(p.numel() * 4 for p in setup.model(frozen=False).parameters()) / 2**30
    small, large = (estimate_step_memory(setup, {k: v[:n] for k, v in batch.items()}) for n in (32, 64))
    for est in (small, large):
        assert est["parameter"] == pytest.approx(weights_gb, rel=1e-9), "float32 weights"
        assert est["optstate"] == pytest.approx(2 * weights_gb, rel=1e-3), "AdamW's exp_avg and exp_avg_sq"
        assert est["total"] >= est["parameter"] + est["optstate"] + est["activation"]
        assert est["dtype"] == "bfloat16"
    assert 1.7 < large["activation"] / small["activation"] < 2.1, "activations scale with the batch"


def test_the_peak_memory_covers_the_warm_up_calls():
    """CUDA graphs allocate their memory pool while they are recorded, in the warm-up calls: memory
    a warm-up call held counts in the measurement's peak (here the CPU's resident set)."""
    import time

    import numpy as np
    import torch

    from mdfnet_hydra.benchmarks.timing import measure

    calls = []

    def step() -> int:
        if not calls:
            held = np.ones(400 * 2**20 // 8)  # 400 MB, touched
            time.sleep(0.1)  # the sampler reads the resident set every 5 ms
            del held
        calls.append(1)
        return 1

    result = measure("warm-up peak", step, torch.device("cpu"), steps=2, warmup=1)
    assert len(calls) == 3 and result["samples"] == 2
    assert result["memory_increase_gb"] > 0.3


def test_a_profiled_measurement_says_where_its_steps_spend_their_time(tmp_path):
    """bench.profile: the timed steps stay unprofiled; as many more run under torch.profiler, and
    the host's milliseconds per step and the table of the ops that took them are written."""
    import torch

    from mdfnet_hydra.benchmarks.timing import measure

    layer = torch.nn.Linear(64, 64)
    calls = []

    def step() -> int:
        calls.append(1)
        layer(torch.randn(8, 64)).sum().backward()
        return 8

    result = measure("stage2/all", step, torch.device("cpu"), steps=3, warmup=1, profile_dir=tmp_path)
    assert len(calls) == 1 + 3 + 3 and result["samples"] == 24, "3 timed steps, then 3 profiled ones"
    profile = result["profile"]
    assert profile["host_ms_per_step"] > 0 and profile["wall_ms_per_step"] > 0 and profile["host_wait_ms_per_step"] >= 0
    assert profile["device_ms_per_step"] is None, "no GPU kernels on a CPU"
    table = (tmp_path / "profile_stage2_all.txt").read_text()
    assert profile["table"] == str(tmp_path / "profile_stage2_all.txt")
    assert "by self CPU time" in table and "aten::addmm" in table


@pytest.mark.parametrize("measurement", ["stage2_clinical", "pipeline"])
def test_a_benchmark_set_smaller_than_one_batch_is_refused_naming_the_fix(tmp_path, measurement):
    """Every measurement, not only the stage-2 steps: the input pipeline's loop over a loader without
    a batch used to wait forever."""
    result = bench(
        f"paths.root={tmp_path}",
        f"bench.output={tmp_path / 'bench.json'}",
        "bench.samples=96",
        "bench.batch_size=128",
        "bench.image_sizes=[32]",
        f"bench.measure=[{measurement}]",
    )
    assert result.returncode == 1
    assert "fewer than one batch of 128: raise bench.samples" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "bench.json").exists()
    assert not list((tmp_path / "bench").glob("[0-9]*/*")), "no run directory left behind"


BAD_BENCHMARKS = [
    (["bench.steps=0"], "bench.steps must be >= 1, got 0"),
    (["bench.warmup=-1"], "bench.warmup must be >= 0, got -1"),
    (["bench.batch_size=0"], "bench.batch_size must be >= 1, got 0"),
    (["bench.image_sizes=[0]"], "bench.image_sizes must be >= 16 pixels (one ViT patch), got [0]"),
    (["bench.measure=[ddp]", "bench.ddp_workers=[0]"], "bench.ddp_workers must list process counts >= 1"),
    (["bench.measure=[text_tokens]", "bench.profile=true"], "bench.profile=true profiles training steps"),
    # what training refuses, the benchmark refuses too
    (["model.text.length_buckets=[16]"], "largest (16) is shorter than model.text.max_length (128)"),
    (["model.text.length_buckets=[16,1024]"], "lengths above model.text.max_length (128): [1024]"),
    (["trainer.compile=true", "trainer.compile_mode=reduce_overhead"], "records a CUDA graph for every report"),
    (["bench.size=real", "model.text.length_buckets=[32,128]"], "shorter than model.text.max_length (256)"),
    (
        ["bench.text_length=256"],
        "bench.text_length=256 is longer than the text encoder takes (model.text.max_length 128)",
    ),
    (["bench.text_length=-1"], "bench.text_length must be >= 0 (0: the data's own reports; or null), got -1"),
]


@pytest.mark.parametrize("overrides,message", BAD_BENCHMARKS)
def test_a_benchmark_it_cannot_run_is_refused_before_any_work(tmp_path, overrides, message):
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from mdfnet_hydra.benchmarks.speed import check_benchmark
    from mdfnet_hydra.config import ConfigError

    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("bench", overrides=[f"paths.root={tmp_path}", *overrides])
    with pytest.raises(ConfigError) as refused:
        check_benchmark(cfg, list(cfg.bench.image_sizes or [64]))
    assert message in str(refused.value)


def test_a_rule_for_text_does_not_refuse_a_benchmark_that_runs_no_text(tmp_path):
    """CUDA-graph modes need length buckets for text: a vision-only measurement runs without them."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from mdfnet_hydra.benchmarks.speed import check_benchmark
    from mdfnet_hydra.config import ConfigError

    graphs = ["trainer.compile=true", "trainer.compile_mode=reduce_overhead"]
    with initialize_config_dir(config_dir=str(CONF)):
        vision = compose("bench", overrides=[f"paths.root={tmp_path}", *graphs, "bench.measure=[stage2_vision]"])
        both = compose(
            "bench", overrides=[f"paths.root={tmp_path}", *graphs, "bench.measure=[stage2_vision,stage2_text]"]
        )
    check_benchmark(vision, [64])
    with pytest.raises(ConfigError, match="records a CUDA graph for every report length"):
        check_benchmark(both, [64])


def test_a_wrong_benchmark_option_is_one_line_and_leaves_no_directory(tmp_path):
    result = bench(f"paths.root={tmp_path}", "bench.steps=0", "bench.measure=[stage2_clinical]")
    assert result.returncode == 1
    assert result.stderr.strip() == "mdfnet_hydra.bench: error: invalid configuration: bench.steps must be >= 1, got 0"
    assert not list((tmp_path / "bench").glob("[0-9]*/*"))
    bogus = subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.bench", f"paths.root={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MDFNET_MACHINE": "bogus"},
    )
    assert bogus.returncode == 1 and "Traceback" not in bogus.stderr
    assert bogus.stderr.strip().startswith("mdfnet_hydra.bench: error: invalid configuration: MDFNET_MACHINE='bogus'")


def test_graphs_compiled_during_the_timed_steps_are_counted_and_named(caplog):
    """A shape the warm-up did not show compiles inside the timed steps, and its compile time lands
    in the rate: the measurement says how many graphs compiled there."""
    import torch
    import torch._dynamo

    from mdfnet_hydra.benchmarks.timing import measure

    shapes = [4, 8]
    for warmup, expected in ((1, 1), (2, 0)):
        torch._dynamo.reset()
        forward = torch.compile(torch.nn.Linear(16, 16), backend="aot_eager", dynamic=False)
        calls = iter(range(100))

        def step(forward=forward, calls=calls) -> int:
            n = shapes[min(next(calls), 1)]
            forward(torch.randn(n, 16)).sum().backward()
            return n

        caplog.clear()
        with caplog.at_level("WARNING", logger="mdfnet_hydra.benchmarks.timing"):
            result = measure("two shapes", step, torch.device("cpu"), steps=3, warmup=warmup)
        assert result["graphs_compiled_while_timed"] == expected
        named = "two shapes: torch compiled 1 graph(s) during the timed steps" in caplog.text
        assert named is bool(expected)


def test_the_real_size_keeps_what_the_encoders_hand_the_fusion(tmp_path):
    """`bench.size=real` swaps in the real architectures but keeps the run's `output` (tokens or one
    pooled vector: a stage-1 sweep's fast path) and the text encoder's pooling, so the pooled path
    can be measured at real size; the default stays tokens."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from mdfnet_hydra.benchmarks.workload import bench_config

    pooled = ["model.vision.output=pooled", "model.text.output=pooled", "model.text.pooling=mean"]
    for overrides, output in (([], "tokens"), (pooled, "pooled")):
        with initialize_config_dir(config_dir=str(CONF)):
            cfg = compose("bench", overrides=[f"paths.root={tmp_path}", "bench.size=real", *overrides])
        run = bench_config(cfg, 224)
        assert run.model.vision.open_clip_config.vision_cfg.timm_model_name == "vit_base_patch16_224"
        assert run.model.text.model_config.hidden_size == 768
        assert str(run.model.vision.output.value) == str(run.model.text.output.value) == output
        assert run.model.text.pooling == ("mean" if overrides else "cls")


def test_the_report_token_measurement_alone_prints_no_step_table(tmp_path):
    """`bench.measure=[text_tokens]` times no step: its line follows the title, with no column header
    or data-loading line above rows that never come."""
    out = tmp_path / "bench.json"
    result = bench(f"paths.root={tmp_path}", f"bench.output={out}", "bench.measure=[text_tokens]")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("mdfnet-hydra benchmark:", 1)[1].splitlines()  # the table, after the log
    assert lines[1].startswith("report tokens (") and lines[2].startswith("results: ")
    assert not any(line.startswith(("measurement", "data loading", "(peak memory")) for line in lines)
    saved = json.loads(out.read_text())
    assert saved["by_image_size"] == {} and saved["text_tokens"]["reports"] > 0


@pytest.mark.parametrize("size", ["tiny", "real"])
def test_the_datas_own_reports_are_padded_to_the_bucket_as_training_pads_them(tmp_path, size):
    """`bench.text_length=0`: the data's own reports at any size, padded to the bucket (a mask in every
    batch, as the trainer's); the bucket's length gives reports of that many real tokens (no padding)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from mdfnet_hydra.benchmarks.workload import Setup, bench_config, text_length
    from mdfnet_hydra.runtime import Runtime

    bucket = 128 if size == "tiny" else 256
    for length, padded in ((0, True), (bucket, False)):
        with initialize_config_dir(config_dir=str(CONF)):
            cfg = compose(
                "bench",
                overrides=[
                    f"paths.root={tmp_path}",
                    f"bench.size={size}",
                    f"bench.text_length={length}",
                    "bench.samples=40",
                    f"model.text.length_buckets=[{bucket}]",
                ],
            )
        assert text_length(cfg.bench) == (None if padded else bucket)
        if size == "real":  # (the real encoders' set-up costs minutes on this CPU: the resolved length suffices)
            continue
        run = bench_config(cfg, 32)
        (batch,) = Setup(run, ["text"], Runtime.from_config(run.trainer), text_length(cfg.bench)).batches(1)
        mask = batch["attention_mask"]
        assert mask.shape[1] == bucket
        assert bool((mask == 0).any()) is padded, "the data's reports are shorter than the bucket"
