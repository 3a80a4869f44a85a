"""Minutes-long end-to-end checks (`pytest -m slow`; CI runs them after the default suite)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from mdfnet_hydra.benchmarks.modality_gap import collect
from mdfnet_hydra.benchmarks.modality_gap import main as modality_gap


@pytest.mark.slow
def test_default_command_learns_and_reports(tmp_path):
    """`python -m mdfnet_hydra.train` exactly as the README runs it (outputs redirected)."""
    result = run_cli(env_extra={"MDFNET_OUTPUT_ROOT": str(tmp_path)}, timeout=900, exact=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary_path,) = tmp_path.glob("runs/*/*/metrics.json")
    summary = json.loads(summary_path.read_text())
    assert summary["objective"] >= 0.75, summary["objective"]
    assert "AUROC of stage2's best_mean checkpoint" in result.stdout
    evaluation = summary_path.parent / "evaluation"
    assert (evaluation / "results.md").is_file() and (evaluation / "roc_curves.png").is_file()
    assert f"evaluation {evaluation}" in result.stdout + result.stderr


@pytest.mark.slow
def test_full_model_beats_every_single_modality(tmp_path):
    out = tmp_path / "sweep"
    code = modality_gap(["--out", str(out), f"paths.root={tmp_path}"])
    scores = collect(out)
    full = scores["all"]["val"][0]
    for single in ("vision", "text", "clinical"):
        assert scores[single]["val"][0] < full - 0.02, (single, scores[single]["val"][0], full)
    assert code == 0


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path, output_root):
    """trainer.compile=true (torch.compile, inductor on CPU) gives the eager run's result (dropout off:
    compiled dropout draws from its own random stream): the full model in stage 2, both encoders
    training, reports padded to length buckets, compiled once per bucket and never again. The
    mode is the README's GPU one, reduce_overhead, with 2-batch accumulation: on a CPU torch records
    no CUDA graphs, so the trainer copies no gradients out of them (the GPU check's graphs_accum
    probe compares that copy with the eager step on a GPU)."""
    import torch

    from conftest import make_cfg
    from mdfnet_hydra.checkpoint import load_checkpoint
    from mdfnet_hydra.pipeline import run

    weights = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compiled-{compiled}"
        run(
            make_cfg(
                [
                    "debug=fast",
                    "stage=stage2",
                    "modality=all",
                    "phases.stage2.epochs=2",
                    "model.text.length_buckets=[64,128]",
                    f"trainer.compile={str(compiled).lower()}",
                    "trainer.compile_mode=reduce_overhead",
                    "trainer.grad_accum=2",
                    "model.fusion.dropout=0",
                    "model.head.dropout1=0",
                    "model.head.dropout2=0",
                    "model.clinical.dropout=0",
                ],
                run_dir,
                output_root,
            )
        )
        weights[compiled] = load_checkpoint(run_dir / "stage2" / "checkpoints" / "last.pth")["model"]
        log = (run_dir / "logs" / "train.log").read_text()
        assert ("through torch.compile (mode reduce-overhead, static shapes, at most 2 graphs" in log) is compiled
        assert "CUDA graphs with 2-batch accumulation" not in log
        if compiled:  # the synthetic reports fit the 64 bucket: one graph, compiled in epoch 1, none after
            epochs = [line for line in log.splitlines() if "stage2 epoch " in line and "ETA" in line]
            assert [line.split("; ")[-1] for line in epochs] == ["compiled graphs 1, graph breaks 0"] * 2
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, atol=1e-4, rtol=1e-3, msg=key)
