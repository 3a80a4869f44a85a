"""`.ci/gpu-check`, the device check a GPU session runs, exercised on this CPU: every GPU command
must compose, every step must run at tiny size with a GPU node's choices (--dry-run), a failing
step must fail the check, and it must run from a checkout that is not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / ".ci" / "gpu-check"


def gpu_check(*args: str, script: Path = SCRIPT, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MDFNET_MACHINE"}
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=script.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_dry_run_composes_every_gpu_command_and_runs_every_step(tmp_path):
    result = gpu_check("--dry-run", "--out", str(tmp_path), "--budget", "1100", timeout=1300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["environment", "nccl", "default", "real_arch", "compile", "graphs_accum", "bench16",
                           "bench64", "compiled16", "compiled16_warm", "compiled16_accum1", "compiled16_data", "compiled64", "compiled128", "compiled256",
                           "trainer16", "stage1_4096", "stage1_loss_eager", "stage1_compiled", "stage1_pooled"]  # fmt: skip
    assert all(s["verdict"] == "PASS" for s in steps.values())
    probes = ("environment", "nccl", "graphs_accum")  # Python snippets, not Hydra commands
    assert all(steps[name]["gpu_command_composes"] for name in steps if name not in probes)
    # the tiny runs took a 16-CPU GPU node's choices
    assert steps["environment"]["details"]["loader"]["num_workers"] == 8
    assert "8 workers (persistent, prefetch 4, fork)" in steps["default"]["details"]["stage2_loading"]
    assert steps["bench64"]["details"]["batch_size"] == 64
    for name in ("compiled16", "compiled16_warm", "compiled128"):  # compiled as the trainer compiles, compile timed
        assert steps[name]["details"]["compile"] == "reduce_overhead" and steps[name]["details"]["first_step_s"] > 0
    assert steps["compiled128"]["details"]["batch_size"] == 128 and steps["compiled256"]["details"]["batch_size"] == 256
    # the benchmark's step accumulates as the trainer's does; stepping every batch is measured beside it
    single = steps["compiled16_accum1"]["details"]
    assert steps["compiled16"]["details"]["grad_accum"] == 2 and single["grad_accum"] == 1
    assert single["over_compiled16"] > 0 and single["profile"]["eager_ops_per_step"] > 0
    # the accumulation probe compared the graphed step with the eager one (on a CPU: no graphs, no error)
    assert steps["graphs_accum"]["details"]["accum2_own_grads_max_diff"] < 1e-4
    # the trainer's own compiled loop, set against the benchmark's compiled step of this check
    trainer = steps["trainer16"]["details"]
    assert trainer["compile_note"] == "compiled graphs 1, graph breaks 0" and trainer["trainer_over_bench"] > 0
    assert trainer["trainer_over_bench_256_real"] > 0  # and against reports of 256 real tokens
    assert steps["compiled16_data"]["details"]["over_compiled16"] > 0
    stage1 = steps["stage1_4096"]["details"]
    assert stage1["stage1_recompute_samples_per_s"] > 0 and stage1["cache_build_samples"] > 0
    assert "cache_build_over_recompute" in stage1["ratios"] and stage1["held_batch_matches_mapped"] is True
    compiled_stage1 = steps["stage1_compiled"]["details"]
    assert compiled_stage1["compile"] == "reduce_overhead" and "stage1_recompute_samples_per_s" not in compiled_stage1
    loss_eager = steps["stage1_loss_eager"]["details"]
    assert compiled_stage1["compile_loss"] is True and loss_eager["compile_loss"] is False
    assert compiled_stage1["over_loss_eager"] > 0  # the loss in the graph against outside it, in one call
    assert steps["stage1_pooled"]["details"]["over_compiled"] > 0  # pooled features against tokens
    for details in (compiled_stage1, loss_eager, steps["compiled16"]["details"]):  # where the compiled steps' time goes
        assert details["profile"]["host_ms_per_step"] > 0 and Path(details["profile"]["table"]).is_file()
    # fewer operators outside the graph with the loss in it (the same count on any machine)
    assert compiled_stage1["profile"]["eager_ops_per_step"] < loss_eager["profile"]["eager_ops_per_step"]
    verdict_lines = [
        line.split()[1]
        for line in result.stdout.splitlines()
        if line.startswith(("PASS ", "FAIL ", "TIMEOUT ", "SKIP "))
    ]
    assert verdict_lines == list(steps), "one verdict line per step"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure path on a machine without a GPU")
def test_a_failing_step_fails_the_check(tmp_path):
    """Without --dry-run on a CPU machine the NCCL step cannot pass: the check says so and exits 1."""
    result = gpu_check("--only", "environment,nccl", "--out", str(tmp_path))
    assert result.returncode == 1
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps["environment"]["verdict"] == "FAIL" and "no CUDA device" in steps["environment"]["reason"]
    assert steps["nccl"]["verdict"] == "FAIL"
    assert "NOT all passed" in result.stdout


def test_runs_from_a_checkout_that_is_not_installed(tmp_path):
    """A GPU box may have torch and no registry: the script puts its own checkout on PYTHONPATH."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    copy = tmp_path / "checkout"
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    result = gpu_check(
        "--dry-run", "--only", "environment", "--out", str(tmp_path / "out"), script=copy / ".ci" / "gpu-check"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    details = json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]["environment"]["details"]
    assert Path(details["mdfnet_hydra"]) == copy / "mdfnet_hydra"


def load_script():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while being defined
    loader.exec_module(module)
    return module


def test_steps_run_together_are_each_killed_at_their_own_limit(tmp_path):
    """A hanging step's whole process group dies at its limit while a step that writes a lot
    beside it finishes normally (its output goes to a file, never a full pipe)."""
    import time

    gc = load_script()
    hang = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(child.pid, flush=True)\ntime.sleep(120)"
    )
    chatty = "import sys\nfor _ in range(50): sys.stdout.write('x' * 10000 + '\\n')\nsys.stderr.write('y' * 100000)"
    steps = [
        gc.Step(
            "hang", 3, lambda ctx: [sys.executable, "-c", hang], None, lambda ctx, out: {}, composes=False, group="g"
        ),
        gc.Step(
            "chatty",
            60,
            lambda ctx: [sys.executable, "-c", chatty],
            None,
            lambda ctx, out: {"chars": len(out)},
            composes=False,
            group="g",
        ),
    ]
    assert gc.batches(steps) == [steps]
    ctx = gc.Context(out=tmp_path, dry=False, env=dict(os.environ))
    started = time.monotonic()
    running = [gc.start(step, ctx, started + 60) for step in steps]
    gc.wait_all(running)
    results = {r.step.name: gc.verdict(r, ctx) for r in running}
    assert results["hang"]["verdict"] == "TIMEOUT" and "its limit" in results["hang"]["reason"]
    assert 3 <= results["hang"]["seconds"] < 10
    child = int((tmp_path / "hang" / "stdout.log").read_text().split()[0])
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2], (
        "the step's child process was killed with it"
    )
    assert results["chatty"]["verdict"] == "PASS" and results["chatty"]["details"]["chars"] >= 500_000
    assert results["chatty"]["seconds"] < results["hang"]["seconds"], "each step's own time, not the group's"


def test_unknown_step_is_refused():
    result = gpu_check("--only", "benchmark")
    assert result.returncode == 2 and "unknown steps ['benchmark']" in result.stderr
