"""What a job's log tells its reader (logs/train.log and the end-of-run summary): the training
setup in one line, why a stage-2-only job starts untrained, and which numbers a debug run's epoch
line is computed on."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from conftest import run_cli

JOB = (
    "modality=clinical",
    "stage=stage2",
    "debug=fast",
    "data.synthetic.num_samples=300",
    "data.synthetic.image_size=32",
    "optimizer=sgd",
    "loss=focal",
    "trainer.max_grad_norm=1.5",
    "trainer.precision=fp32",
    "seed=7",
    "trainer.limit_val_batches=1",
)


def run_job(root: Path, *overrides: str):
    with pytest.MonkeyPatch.context() as env:
        env.delenv("OMP_NUM_THREADS", raising=False)  # as a user without it runs the job
        result = run_cli(*JOB, *overrides, f"paths.root={root}", f"hydra.run.dir={root / 'run'}", timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def job_root(tmp_path_factory) -> Path:
    """The directory of one small stage-2-only job (its run in run/)."""
    root = tmp_path_factory.mktemp("run_log")
    result = run_job(root)
    (root / "console.txt").write_text(result.stdout + result.stderr)
    return root


@pytest.fixture(scope="module")
def job_log(job_root) -> tuple[str, str]:
    """(logs/train.log, console output) of the small stage-2-only job."""
    return (job_root / "run" / "logs" / "train.log").read_text(), (job_root / "console.txt").read_text()


def test_the_log_states_the_training_setup_in_one_line(job_log):
    log, _ = job_log
    (line,) = [line for line in log.splitlines() if "] optimizer " in line]
    assert "optimizer sgd (momentum 0.9, nesterov, weight decay 0.0001)" in line
    assert "loss 1 x focal (focal alpha 0.25, gamma 2)" in line
    assert "gradient clipping max_grad_norm 1.5" in line
    assert "precision fp32" in line and "seed 7" in line
    assert log.index("] optimizer ") < log.index("epoch 1/1"), "stated at the start"


def test_without_omp_num_threads_a_job_computes_on_the_cpus_it_may_use(job_log):
    """The choice every user's job makes (the test processes' OMP_NUM_THREADS removed for it)."""
    log, _ = job_log
    cpus = len(os.sched_getaffinity(0))
    found = re.search(rf"machine: {cpus} CPUs?, no CUDA; (\d+) compute thread\(s\) \(the affinity set\)", log)
    assert found and 1 <= int(found[1]) <= cpus, log[:2000]


def test_a_stage2_job_without_init_from_warns_at_start_and_in_the_summary(job_log):
    log, _ = job_log
    warning = "stage 2 starts from an untrained fusion and head"
    assert log.count(warning) == 2, "at the start and again in the end-of-run summary"
    start, summary = log.index(warning), log.rindex(warning)
    assert "[WARNING]" in log[log.rfind("\n", 0, start) : start]
    assert start < log.index("epoch 1/1") < summary < log.index("AUROC of stage2's")
    assert "stage.init_from=<run>/stage1/checkpoints/best_mean.pth" in log and "stage=two_stage" in log


def test_a_limited_epoch_line_says_on_what_it_is_computed(job_log):
    log, _ = job_log
    (line,) = [line for line in log.splitlines() if "stage2 epoch 1/1 |" in line]
    assert re.search(
        r"val \(first 1 of \d+ batches\) loss [\d.]+ \| val \(first 1 of \d+ batches\) mean AUROC", line
    ), line
    assert "stage2 ETA" in line


def test_a_windows_gradients_sum_to_the_same_weights_either_way(job_root, tmp_path):
    """trainer.grad_accum_foreach (default true: one multi-tensor add per batch) against autograd's
    own accumulation (false): each log says which ran, and the two jobs' weights are equal bit for bit
    (debug=fast: 4 batches in windows of trainer.grad_accum 2, SGD, clipping, fp32)."""
    from mdfnet_hydra.checkpoint import load_checkpoint

    run_job(tmp_path, "trainer.grad_accum_foreach=false")
    logs = {
        name: (root / "run" / "logs" / "train.log").read_text()
        for name, root in (("sums", job_root), ("autograd", tmp_path))
    }
    assert "2 batches' gradients summed outside autograd (one multi-tensor add per batch)" in logs["sums"]
    assert "2 batches' gradients summed by autograd (an add per parameter tensor)" in logs["autograd"]
    a = load_checkpoint(job_root / "run" / "stage2" / "checkpoints" / "last.pth")["model"]
    b = load_checkpoint(tmp_path / "run" / "stage2" / "checkpoints" / "last.pth")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_summary_counts_each_splits_defined_labels_when_they_differ():
    """The test mean is over the test split's defined labels: a label without positives on test
    but with some on validation makes the counts differ, and the mean's line says both."""
    import numpy as np

    from mdfnet_hydra.labels import CHEXPERT_LABELS
    from mdfnet_hydra.metrics import compute_metrics
    from mdfnet_hydra.report import format_summary

    rng = np.random.default_rng(0)
    targets = (rng.random((60, 14)) < 0.4).astype(np.float32)
    probs = rng.random((60, 14)).astype(np.float32)
    val = compute_metrics(probs, targets, np.ones_like(targets))
    test_targets = targets.copy()
    test_targets[:, CHEXPERT_LABELS.index("Fracture")] = 0  # no positive on test
    test = compute_metrics(probs, test_targets, np.ones_like(targets))

    def summary(test_result):
        stage = {"val": val, "test": test_result, "selected_checkpoint": "best_mean", "best_epoch": 1}
        stage.update(epochs_run=1, wall_time_s=1.0)
        return format_summary({"stage2": stage}, Path("run")).splitlines()

    (line,) = [line for line in summary(test) if line.lstrip().startswith("mean (")]
    assert line.split() == ["mean", "(14", "val", "/", "13", "test", "defined", "labels)"] + [
        f"{val['auroc_mean']:.3f}",
        f"{test['auroc_mean']:.3f}",
    ]
    lines = summary(test)
    table = lines[1 : lines.index(line) + 3]  # the header to macro F1
    width = len("mean (14 val / 13 test defined labels)")
    cells = [(row[2 + width + 1 : 2 + width + 7].strip(), row[2 + width + 8 : 2 + width + 14].strip()) for row in table]
    assert cells[0] == ("val", "test") and cells[-3:][0] == (f"{val['auroc_mean']:.3f}", f"{test['auroc_mean']:.3f}")
    assert all(re.fullmatch(r"\d\.\d{3}|n/a", cell) for row in cells[1:] for cell in row), "numbers in their columns"
    assert "  undefined on test (no positives or no negatives), left out of the test mean: Fracture" in lines
    (same,) = [line for line in summary(val) if line.lstrip().startswith("mean (")]
    assert same.startswith("  mean (14 defined labels)      "), "as the README shows it"
