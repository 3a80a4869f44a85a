"""The evaluation command on runs with known predictions, and on real (tiny) training runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import REPO, make_cfg
from mdfnet_hydra.config import EvaluationConfig
from mdfnet_hydra.evaluation.report import evaluate
from mdfnet_hydra.evaluation.stats import delong_test
from mdfnet_hydra.evaluation.tables import COMPARISON_COLUMNS
from mdfnet_hydra.labels import CHEXPERT_LABELS
from mdfnet_hydra.predictions import file_digest

N = 240
FRACTURE = CHEXPERT_LABELS.index("Fracture")


def ground_truth(seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((N, 14)) < 0.3).astype(np.float32)
    targets[:, FRACTURE] = 0  # no positive in the test set: undefined, never 0
    mask = np.ones_like(targets)
    groups = np.repeat(np.arange(N // 2), 2)  # two studies per patient
    return targets, mask, groups


def fake_run(root, name, modalities, seed, strength, targets, mask, groups, first_id=0):
    """A finished stage directory with saved predictions whose digest matches its checkpoint (test
    cases s<first_id>, s<first_id + 1>, ...)."""
    directory = root / name / "stage2"
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "predictions").mkdir()
    ckpt = directory / "checkpoints" / "best_mean.pth"
    ckpt.write_bytes(f"{name}-{seed}".encode())
    config = {
        "seed": seed,
        "modality": {"name": "_".join(modalities), "inputs": modalities},
        "data": {"name": "synthetic"},
        "phases": {"stage1": {"lr": 1e-3}},
        "loss": {"bce_weight": 0.7},
    }
    OmegaConf.save(OmegaConf.create(config), directory / "config.yaml")
    (directory / "metrics.json").write_text(
        json.dumps({"stage": "stage2", "modalities": modalities, "val": {"auroc_mean": 0.5}})
    )
    rng = np.random.default_rng(zlib.crc32(f"{name}-{seed}".encode()))
    for split in ("val", "test"):
        probs = 1 / (1 + np.exp(-(strength * (targets - 0.5) * 4 + rng.normal(size=targets.shape))))
        np.savez(
            directory / "predictions" / f"{split}.npz",
            probs=probs.astype(np.float32),
            targets=targets,
            mask=mask,
            raw_labels=targets,
            sample_id=np.array([f"s{i:04d}" for i in range(first_id, first_id + N)]),
            group=groups,
            label_names=np.array(CHEXPERT_LABELS),
            checkpoint=np.array("best_mean.pth"),
            checkpoint_sha256=np.array(file_digest(ckpt)),
        )
    return directory


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    targets, mask, groups = ground_truth()
    for name, modalities, seed, strength in [
        ("vision_s1", ["vision"], 1, 0.5),
        ("vision_s2", ["vision"], 2, 0.5),
        ("all_s1", ["vision", "text", "clinical"], 1, 1.0),
        ("all_s2", ["vision", "text", "clinical"], 2, 1.0),
        ("text_s1", ["text"], 1, 0.1),
    ]:
        fake_run(root, name, modalities, seed, strength, targets, mask, groups)
    out = root.parent / "results"
    options = OmegaConf.merge(OmegaConf.structured(EvaluationConfig), {"n_bootstrap": 300, "saliency_per_label": 0})
    evaluate(root, out, options)
    with (out / "results_summary.csv").open() as handle:
        rows = {r["run"]: r for r in csv.DictReader(handle)}
    with (out / "comparisons.csv").open() as handle:
        reader = csv.DictReader(handle)
        comparisons = list(reader)
    assert tuple(reader.fieldnames) == COMPARISON_COLUMNS, "the header an empty comparisons.csv keeps"
    return root, out, rows, comparisons, (targets, mask, groups)


def load(root, run, split="test"):
    return np.load(root / run / "stage2" / "predictions" / f"{split}.npz")


def test_summary_matches_sklearn_and_ranks_runs(known):
    root, out, rows, _, _ = known
    assert [r.split("_")[0] for r in rows] == ["all", "all", "vision", "vision", "text"], "ranked by test mean AUROC"
    for name, row in rows.items():
        pred = load(root, name.split("/")[0])
        per_label = [roc_auc_score(pred["targets"][:, j], pred["probs"][:, j]) for j in range(14) if j != FRACTURE]
        assert float(row["test_auroc_mean"]) == pytest.approx(np.mean(per_label), abs=1e-4)
        assert float(row["auroc/Cardiomegaly"]) == pytest.approx(
            per_label[CHEXPERT_LABELS.index("Cardiomegaly")], abs=1e-4
        )
        assert row["auroc/Fracture"] == "" and row["undefined_labels"] == "Fracture"
        assert float(row["ci95_low"]) < float(row["test_auroc_mean"]) < float(row["ci95_high"])
        assert row["predictions"] == "saved"
    assert rows["vision_s1/stage2"]["target"] == "vision-only (MDF-Net paper) 0.810"
    assert float(rows["vision_s1/stage2"]["difference_to_target"]) == pytest.approx(
        float(rows["vision_s1/stage2"]["test_auroc_mean"]) - 0.810, abs=2e-4
    )
    assert "Enhanced MDF-Net goal 0.860" in rows["all_s1/stage2"]["target"]
    assert rows["text_s1/stage2"]["target"] == ""


def test_paired_comparisons_against_vision(known):
    root, out, _, comparisons, (targets, mask, groups) = known
    mean_rows = [c for c in comparisons if c["label"].startswith("mean AUROC")]
    assert {(c["run"], c["baseline"]) for c in mean_rows} == {
        ("all_s1/stage2", "vision_s1/stage2"),
        ("all_s2/stage2", "vision_s2/stage2"),
    }
    for c in mean_rows:
        assert float(c["difference"]) > 0.05 and float(c["ci95_low"]) > 0
        assert float(c["p_value"].lstrip("<")) <= 1 / 300 + 1e-9, "the smallest p a 300-resample bootstrap can give"
    edema = next(c for c in comparisons if c["run"] == "all_s1/stage2" and c["label"] == "Edema (DeLong)")
    j = CHEXPERT_LABELS.index("Edema")
    # clustered by patient: the split's studies share patients (ground_truth's groups)
    reference = delong_test(
        targets[:, j], load(root, "all_s1")["probs"][:, j], load(root, "vision_s1")["probs"][:, j], groups
    )
    assert float(edema["difference"]) == pytest.approx(reference.difference, abs=1e-4)
    assert float(edema["ci95_low"]) == pytest.approx(reference.ci_low, abs=1e-4)
    fracture = next(c for c in comparisons if c["run"] == "all_s1/stage2" and c["label"] == "Fracture (DeLong)")
    assert fracture["difference"] == "undefined" and fracture["p_holm"] == ""
    # Holm over the 13 tested labels of one comparison, from the unrounded p-values
    labels = [name for name in CHEXPERT_LABELS if name != "Fracture"]
    tests = [
        delong_test(
            targets[mask[:, k] > 0, k],
            load(root, "all_s1")["probs"][mask[:, k] > 0, k],
            load(root, "vision_s1")["probs"][mask[:, k] > 0, k],
            groups[mask[:, k] > 0],
        )
        for k in (CHEXPERT_LABELS.index(name) for name in labels)
    ]
    raw = [test.p_value for test in tests]
    ranked = sorted(range(13), key=lambda i: raw[i])
    expected = {}
    for position, i in enumerate(ranked):  # step-down: (m - position) times, never below an earlier one
        expected[labels[i]] = min(1.0, max([(13 - q) * raw[ranked[q]] for q in range(position + 1)]))
    for name in labels:
        row = next(c for c in comparisons if c["run"] == "all_s1/stage2" and c["label"] == f"{name} (DeLong)")
        shown = "<0.001" if expected[name] < 0.001 else f"{expected[name]:.3f}"
        assert row["p_holm"] == shown, name
    assert all(c["p_holm"] == "" for c in mean_rows)
    markdown = (out / "results.md").read_text()
    assert "| all_s1/stage2 | vision_s1/stage2 |" in markdown and "| Fracture | undefined |" in markdown
    line = next(row for row in markdown.splitlines() if row.startswith("| all_s1/stage2 | vision_s1/stage2 |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]

    def better_worse(p_values):
        return f"{sum(p < 0.05 and t.difference > 0 for p, t in zip(p_values, tests))} / " + str(
            sum(p < 0.05 and t.difference < 0 for p, t in zip(p_values, tests))
        )

    assert cells[4:] == [better_worse(raw), better_worse([expected[name] for name in labels])]


def test_seeds_are_aggregated(known):
    _, out, rows, _, _ = known
    markdown = (out / "results.md").read_text()
    values = [float(rows[f"all_s{s}/stage2"]["test_auroc_mean"]) for s in (1, 2)]
    line = next(
        row for row in markdown.splitlines() if row.startswith(("| vision_text_clinical/stage2 ", "| all/stage2 "))
    )
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "2" and float(cells[4]) == pytest.approx(np.mean(values), abs=1e-3)
    assert float(cells[5]) == pytest.approx(np.std(values, ddof=1), abs=1e-3)


def test_figures_are_written_and_not_blank(known):
    _, out, _, _, _ = known
    for name in (
        "roc_curves.png",
        "pr_curves.png",
        "auroc_by_label.png",
        "calibration.png",
        "confusion/all_s1_stage2.png",
    ):
        with Image.open(out / name) as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
            assert image.size[0] >= 1500 and image.size[1] >= 700, (name, image.size)
            assert pixels.std() > 10 and (pixels < 128).mean() > 0.01, f"{name} looks blank"


def test_results_md_maps_figure_labels_to_runs(known):
    _, out, rows, _, _ = known
    section = (out / "results.md").read_text().split("### Run labels in the figures", 1)[1]
    table = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
    ]
    assert table[0] == ["label", "run"]
    assert dict((run, label) for label, run in table[1:]) == {
        "all_s1/stage2": "all stage2 s1",
        "all_s2/stage2": "all stage2 s2",
        "vision_s1/stage2": "vision stage2 s1",
        "vision_s2/stage2": "vision stage2 s2",
        "text_s1/stage2": "text stage2 s1",
    }
    assert set(rows) == {run for _, run in table[1:]}, "every run in the figures (max_curves 6) is listed"


@pytest.mark.slow  # 18 s: a training job, then the evaluation twice
def test_stale_predictions_are_recomputed_from_the_checkpoint(tmp_path, output_root):
    """A real tiny run: saved predictions are reused while their digest matches the checkpoint; a
    re-saved checkpoint with the same weights is recomputed to the same numbers; changed weights change them."""
    import torch

    from mdfnet_hydra.pipeline import run

    run_dir = tmp_path / "run"
    # float32 feature cache: the saved (stage-1, cached-feature) predictions then equal recomputing
    # the encoders; the float16 default agrees to about 1e-3 AUROC, not to the 2e-4 asked below
    run(
        make_cfg(
            [
                "debug=fast",
                "stage=stage1",
                "modality=vision_clinical",
                "data.small_sample=null",
                "trainer.limit_val_batches=null",
                "evaluation.on_finish=false",
                "data.feature_cache_dtype=float32",
            ],
            run_dir,
            output_root,
        )
    )
    options = OmegaConf.merge(OmegaConf.structured(EvaluationConfig), {"n_bootstrap": 50, "saliency_per_label": 1})

    def summary(name):
        evaluate(run_dir, tmp_path / name, options)
        return next(csv.DictReader((tmp_path / name / "results_summary.csv").open()))

    saved = summary("first")
    assert saved["predictions"] == "saved"
    assert list((tmp_path / "first" / "saliency" / "stage1").glob("*.png")), "Grad-CAM maps for a vision run"
    ckpt_path = run_dir / "stage1" / "checkpoints" / "best_mean.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["resaved"] = True  # other bytes, same weights
    torch.save(ckpt, ckpt_path)
    same = summary("second")
    assert same["predictions"] == "recomputed"
    for key in ("test_auroc_mean", "auroc/Cardiomegaly", "f1_macro"):
        assert float(same[key]) == pytest.approx(float(saved[key]), abs=2e-4), key
    with torch.no_grad():
        ckpt["model"] = {
            k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ckpt["model"].items()
        }
    torch.save(ckpt, ckpt_path)
    changed = summary("third")
    assert changed["predictions"] == "recomputed" and changed["test_auroc_mean"] != saved["test_auroc_mean"]


def test_cli_and_end_of_run_evaluation(tmp_path):
    from conftest import run_cli

    result = run_cli(
        "debug=fast",
        "modality=vision_clinical",
        f"paths.root={tmp_path}",
        "data.synthetic.num_samples=300",
        "data.synthetic.image_size=32",
        f"hydra.run.dir={tmp_path / 'run'}",
        "evaluation.saliency_per_label=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    end_of_run = tmp_path / "run" / "evaluation"
    assert (end_of_run / "results.md").is_file() and (end_of_run / "roc_curves.png").is_file()
    with (end_of_run / "results_summary.csv").open() as handle:
        assert {r["run"] for r in csv.DictReader(handle)} == {"stage1", "stage2"}
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "mdfnet_hydra.evaluate",
            f"experiments_dir={tmp_path / 'run'}",
            f"output_dir={tmp_path / 'results'}",
            "evaluation.n_bootstrap=100",
            "evaluation.figures=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert (tmp_path / "results" / "results_summary.csv").is_file() and not (
        tmp_path / "results" / "roc_curves.png"
    ).exists()


# --- what a run is compared with and counted as ---------------------------------------------------


@pytest.fixture(scope="module")
def doubtful(tmp_path_factory):
    """Runs a careless reading would pair or count: a multimodal run scored against other labels
    than the vision runs (uncertain findings counted positive, blanks negative, where the vision
    runs mask them), a vision run copied under a second name, a vision seed trained twice, and two seeds of a text run drawn on
    different test cases (data.small_sample). Evaluated once, without bootstrap or figures."""
    root = tmp_path_factory.mktemp("doubtful") / "experiments"
    targets, _, groups = ground_truth(seed=3)
    holes = (np.random.default_rng(4).random(targets.shape) > 0.2).astype(np.float32)
    fake_run(root, "vision_s1", ["vision"], 1, 0.5, targets, holes, groups)
    shutil.copytree(root / "vision_s1", root / "vision_s1_copy")
    fake_run(root, "vision_s2", ["vision"], 2, 0.5, targets, holes, groups)
    # seed 2 trained again (say on 4 GPUs): another checkpoint, not another seed
    fake_run(root, "vision_s2_4gpu", ["vision"], 2, 0.5, targets, holes, groups)
    ones = np.where(holes > 0, targets, 1.0).astype(np.float32)
    fake_run(root, "all_ones", ["vision", "text", "clinical"], 1, 1.0, ones, np.ones_like(holes), groups)
    fake_run(root, "text_s1", ["text"], 1, 0.3, targets, holes, groups)
    fake_run(root, "text_s2", ["text"], 2, 0.3, targets, holes, groups, first_id=N // 2)
    out = root.parent / "results"
    options = OmegaConf.merge(
        OmegaConf.structured(EvaluationConfig), {"n_bootstrap": 0, "figures": False, "saliency_per_label": 0}
    )
    evaluate(root, out, options)
    with (out / "comparisons.csv").open() as handle:
        comparisons = list(csv.DictReader(handle))
    markdown = (out / "results.md").read_text()
    seeds = {
        cells[0]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")] for line in markdown.split("## Seeds")[1].splitlines()
        )
        if "/stage2" in cells[0]
    }
    return comparisons, markdown, seeds


def test_runs_scored_against_other_labels_are_not_compared(doubtful):
    """Same sample ids, other targets and masks (data.labels.*): the difference of two AUROCs on
    different labels is not a paired comparison; results.md says why the pair is missing."""
    comparisons, markdown, _ = doubtful
    assert comparisons == [], "all_ones is scored on other labels than every vision run"
    compared = markdown.split("## Against the vision-only baseline")[1].split("## Seeds")[0]
    (note,) = [line for line in compared.splitlines() if line.startswith("- all_ones/stage2:")]
    assert note.startswith("- all_ones/stage2: no vision-only run on the same test set to compare with")
    assert "vision_s1/stage2: same test cases, but other targets or masks on" in note and "data.labels" in note


def test_a_copied_run_is_one_seed_not_two(doubtful):
    """A run directory copied under a second name holds the same checkpoint: counted once."""
    _, markdown, seeds = doubtful
    configuration, runs, seed_list, n = seeds["vision/stage2"][:4]
    assert (runs, seed_list, n) == ("vision_s1/stage2, vision_s2/stage2, vision_s2_4gpu/stage2", "1, 2", "2")
    assert "- vision_s1_copy/stage2 is a copy of vision_s1/stage2 (the same checkpoint" in markdown


def test_a_seed_trained_twice_is_one_seed_at_its_mean(doubtful):
    """Two runs of seed 2 (another checkpoint each: a rerun, another device count) are not two seeds:
    the spread is over seeds 1 and 2, seed 2 at the mean of its two runs (it reported n = 3 before)."""
    _, markdown, seeds = doubtful
    assert "- vision_s2/stage2, vision_s2_4gpu/stage2 share seed 2 (trained again" in markdown
    runs = {}  # each run's test mean AUROC, from the per-run table (3 decimals)
    for line in markdown.split("## Per-label test AUROC")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("vision_s1/stage2", "vision_s2/stage2", "vision_s2_4gpu/stage2"):
            runs[cells[0]] = float(cells[4].split()[0])
    per_seed = [runs["vision_s1/stage2"], (runs["vision_s2/stage2"] + runs["vision_s2_4gpu/stage2"]) / 2]
    mean, std = float(seeds["vision/stage2"][4]), float(seeds["vision/stage2"][5])
    assert mean == pytest.approx(np.mean(per_seed), abs=1e-3)
    assert std == pytest.approx(np.std(per_seed, ddof=1), abs=1.5e-3)


def test_seeds_on_different_test_cases_are_marked(doubtful):
    """data.small_sample draws each seed's test subset: the group is kept, marked, and noted."""
    _, markdown, seeds = doubtful
    assert seeds["text/stage2"][3] == "2" and seeds["text/stage2"][6] == "differ (2 sets)"
    assert seeds["vision/stage2"][6] == "same"
    assert "- text/stage2: its 2 runs were scored on 2 different sets of test cases" in markdown


# --- the command's input --------------------------------------------------------------------------


def evaluate_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.evaluate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize("given", ["absent", "a_file", "", "empty_dir"])
def test_nothing_to_evaluate_is_one_line_and_leaves_no_output_directory(tmp_path, given):
    (tmp_path / "a_file").write_text("not runs")
    (tmp_path / "empty_dir" / "stage1").mkdir(parents=True)  # no run in it
    result = evaluate_cli(f"experiments_dir={given}", cwd=tmp_path)
    expected = {
        "absent": f"experiments_dir {tmp_path / 'absent'} does not exist",
        "a_file": f"experiments_dir {tmp_path / 'a_file'} is not a directory",
        "": "experiments_dir is empty",
        "empty_dir": f"no finished runs under {tmp_path / 'empty_dir'}: nothing to evaluate",
    }[given]
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().startswith(f"mdfnet_hydra.evaluate: error: {expected}"), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists(), "no results/ holding only Hydra's record"


@pytest.mark.parametrize("output", ["run", "."])
def test_an_output_dir_that_is_or_holds_the_runs_is_refused_before_hydra_writes_there(tmp_path, output):
    """A run's own directory (or its parent) as output_dir: every run would be skipped as output,
    and Hydra would write its .hydra/ over the training run's record. Refused first, nothing written."""
    run = fake_run(tmp_path, "run", ["vision"], 1, 0.5, *ground_truth()).parent
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- modality=all\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = evaluate_cli("experiments_dir=run", f"output_dir={output}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    what = "is experiments_dir itself" if output == "run" else f"holds experiments_dir {run}"
    assert result.stderr.strip() == (
        f"mdfnet_hydra.evaluate: error: output_dir {(tmp_path / output).resolve()} {what}: every run would be "
        "skipped as part of the output, and Hydra's .hydra/ record there written over; choose another output_dir, "
        "outside it or a folder of its own inside it"
    )
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- modality=all\n"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing written"
    if output == "run":  # a folder of its own inside the run is fine: skipped as output, the run evaluated
        inside = evaluate_cli("experiments_dir=run", "output_dir=run/mine", "evaluation.figures=false", cwd=tmp_path)
        assert inside.returncode == 0, inside.stderr[-2000:]
        with (run / "mine" / "results_summary.csv").open() as handle:
            assert [r["run"] for r in csv.DictReader(handle)] == ["stage2"]


def test_a_bootstrap_of_a_few_resamples_is_refused(tmp_path):
    """One resample gives a "95% CI" of a single point and a p-value of 1: 0 (none) or >= 100."""
    result = evaluate_cli(f"experiments_dir={tmp_path}", "evaluation.n_bootstrap=1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "mdfnet_hydra.evaluate: error: invalid configuration: evaluation.n_bootstrap must be 0 (no intervals or "
        "p-values) or >= 100 (resamples behind each 95% interval and p-value), got 1"
    )
    assert not (tmp_path / "results").exists()
