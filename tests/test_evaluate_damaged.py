"""One broken run never sinks an evaluation: runs with a half-written metrics.json, a checkpoint that
needs pickle, or saved predictions holding Python objects are left out (or recomputed) and listed;
predictions files are written atomically and read without pickle; seeds group only runs whose
configurations differ in the seed alone."""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, make_cfg
from mdfnet_hydra.config import EvaluationConfig
from mdfnet_hydra.data.dataset import SplitData
from mdfnet_hydra.evaluation.report import evaluate
from mdfnet_hydra.evaluation.runs import NoRunEvaluatedError, discover
from mdfnet_hydra.files import DamagedFileError
from mdfnet_hydra.predictions import file_digest, load_predictions, save_predictions

OPTIONS = {"n_bootstrap": 20, "figures": False, "saliency_per_label": 0}


class Payload:
    """What a tampered checkpoint could hold: unpickling it opens (creates) `marker`."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class WeightsDict(collections.OrderedDict):
    """A state-dict subclass: harmless here, but only pickle (a GLOBAL of this module) rebuilds it."""


def options(**extra):
    return OmegaConf.merge(OmegaConf.structured(EvaluationConfig), {**OPTIONS, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, output_root):
    """One tiny real stage-1 run (about 10 s): its stage directory is copied into each test folder."""
    from mdfnet_hydra.pipeline import run

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(make_cfg(["debug=fast", "stage=stage1", "modality=vision"], run_dir, output_root))
    return run_dir / "stage1"


def copy_run(trained, root, name):
    target = root / name / "stage1"
    shutil.copytree(trained, target)
    return target


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_pickle_checkpoint(path, marker):
    """A checkpoint whose weights sit beside an object only pickle could build (and that would create
    `marker` when built)."""
    state = torch.load(path, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, path)


def write_object_npz(path):
    """What a foreign writer might leave: the right keys, but object arrays."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["probs"] = np.array([list(row) for row in arrays["probs"]], dtype=object)
    arrays["sample_id"] = arrays["sample_id"].astype(object)
    np.savez(path, **arrays)


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def mixed(trained, tmp_path_factory):
    """Two good runs and one of each kind of damage, evaluated once."""
    root = tmp_path_factory.mktemp("mixed") / "experiments"
    for name in ("good_a", "good_b"):
        copy_run(trained, root, name)
    truncate(copy_run(trained, root, "bad_metrics") / "metrics.json")
    marker = root.parent / "pickle_ran"
    write_pickle_checkpoint(copy_run(trained, root, "bad_checkpoint") / "checkpoints" / "best_mean.pth", marker)
    subclass = copy_run(trained, root, "subclass_checkpoint") / "checkpoints" / "best_mean.pth"
    state = torch.load(subclass, weights_only=True)
    state["model"] = WeightsDict(state["model"])
    torch.save(state, subclass)
    write_object_npz(copy_run(trained, root, "object_npz") / "predictions" / "test.npz")
    both = copy_run(trained, root, "object_npz_bad_checkpoint")
    write_object_npz(both / "predictions" / "test.npz")
    truncate(both / "checkpoints" / "best_mean.pth")

    handler = Captured()
    logging.getLogger("mdfnet_hydra").addHandler(handler)
    try:
        result = evaluate(root, root.parent / "results", options())
    finally:
        logging.getLogger("mdfnet_hydra").removeHandler(handler)
    out = root.parent / "results"
    with (out / "results_summary.csv").open() as handle:
        rows = {r["run"]: r for r in csv.DictReader(handle)}
    return root, out, result, rows, handler.messages, marker


def test_good_runs_are_evaluated_and_broken_ones_listed(mixed):
    root, out, result, rows, warnings, marker = mixed
    assert result["runs"] == 3
    evaluated = {name for name, row in rows.items() if not row["left_out"]}
    assert evaluated == {"good_a/stage1", "good_b/stage1", "object_npz/stage1"}
    for name in evaluated:
        assert 0 <= float(rows[name]["test_auroc_mean"]) <= 1
    expected = {
        "bad_metrics/stage1": ("bad_metrics/stage1/metrics.json", "not valid JSON"),
        "bad_checkpoint/stage1": ("bad_checkpoint/stage1/checkpoints/best_mean.pth", "weights_only"),
        "subclass_checkpoint/stage1": ("subclass_checkpoint/stage1/checkpoints/best_mean.pth", "WeightsDict"),
        "object_npz_bad_checkpoint/stage1": (
            "object_npz_bad_checkpoint/stage1/checkpoints/best_mean.pth",
            "predictions/test.npz is damaged too",
        ),
    }
    left = {item["run"]: item for item in result["left_out"]}
    assert set(left) == set(expected)
    markdown = (out / "results.md").read_text()
    assert "## Left out" in markdown
    for name, (file, why) in expected.items():
        assert rows[name]["predictions"] == "left out" and rows[name]["test_auroc_mean"] == ""
        assert rows[name]["left_out"].startswith(f"{file}: ") and why in rows[name]["left_out"], rows[name]["left_out"]
        assert left[name]["file"] == str(root / file)
        line = next(row for row in markdown.splitlines() if row.startswith(f"| {name} | {file} |"))
        assert why in line, line
        assert any(file in w and name in w for w in warnings), (file, warnings)
        assert "\n" not in left[name]["reason"]
    assert "only pickle could load" in left["subclass_checkpoint/stage1"]["reason"]
    metric_table = markdown.split("## Left out")[0]
    assert "| good_a/stage1 | vision |" in metric_table
    assert not any(name in metric_table for name in expected)


def test_the_crafted_pickle_never_runs(mixed):
    root, _, _, _, _, marker = mixed
    assert not marker.exists(), "the checkpoint's pickled payload was executed"
    # the payload is live: unpickling it (which the evaluation must never do) creates its marker
    control = root.parent / "control.pth"
    other = root.parent / "control_ran"
    torch.save({"model": {}, "extra": Payload(other)}, control)
    torch.load(control, weights_only=False)
    assert other.exists()


def test_damaged_saved_predictions_are_recomputed_from_a_valid_checkpoint(mixed):
    _, out, _, rows, warnings, _ = mixed
    row = rows["object_npz/stage1"]
    assert row["predictions"] == "recomputed" and not row["left_out"]
    assert "predictions/test.npz damaged" in row["notes"] and "Python objects" in row["notes"]
    assert rows["good_a/stage1"]["predictions"] == "saved" and rows["good_a/stage1"]["notes"] == ""
    # the same weights and data: the recomputed metrics are those of the intact copies
    assert float(row["test_auroc_mean"]) == pytest.approx(float(rows["good_a/stage1"]["test_auroc_mean"]), abs=2e-3)
    assert "- object_npz/stage1: predictions/test.npz damaged" in (out / "results.md").read_text()
    assert any("object_npz/stage1" in w and "test.npz" in w and "recomputing" in w for w in warnings)


def test_a_run_whose_data_cannot_be_loaded_is_left_out(trained, tmp_path):
    """Predictions to recompute (here: damaged) on a dataset that is not there: that run is left out,
    the others are evaluated."""
    root = tmp_path / "experiments"
    copy_run(trained, root, "good")
    moved = copy_run(trained, root, "needs_data")
    truncate(moved / "predictions" / "test.npz")
    checkpoint = moved / "checkpoints" / "best_mean.pth"
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["data"].update(name="processed", synthetic=None, root=str(tmp_path / "dataset_moved_away"))
    torch.save(state, checkpoint)  # trained on a prepared dataset that is not on this machine
    result = evaluate(root, tmp_path / "results", options())
    reasons = {item["run"]: item["reason"] for item in result["left_out"]}
    assert "its data cannot be loaded" in reasons["needs_data/stage1"], reasons
    assert "good/stage1" not in reasons


def test_a_diverged_checkpoint_is_left_out_not_scored(trained, tmp_path):
    """An older version kept a diverged model (NaN weights) as a run's best: its recomputed
    predictions are NaN, and that run is left out, named, where the whole evaluation used to stop
    with compute_metrics' error."""
    root = tmp_path / "experiments"
    copy_run(trained, root, "good")
    diverged = copy_run(trained, root, "diverged")
    checkpoint = diverged / "checkpoints" / "best_mean.pth"
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, checkpoint)  # its saved predictions are of other weights: recomputed
    result = evaluate(root, tmp_path / "results", options())
    reasons = {item["run"]: item["reason"] for item in result["left_out"]}
    assert "predictions are NaN or infinite (a diverged model)" in reasons["diverged/stage1"], reasons
    assert "good/stage1" not in reasons


def test_every_run_broken_fails_with_one_line(trained, tmp_path):
    root = tmp_path / "experiments"
    truncate(copy_run(trained, root, "half_written") / "metrics.json")
    marker = tmp_path / "pickle_ran"
    write_pickle_checkpoint(copy_run(trained, root, "tampered") / "checkpoints" / "best_mean.pth", marker)
    with pytest.raises(NoRunEvaluatedError) as caught:
        evaluate(root, tmp_path / "results", options())
    message = str(caught.value)
    assert "\n" not in message
    assert "half_written/stage1 (half_written/stage1/metrics.json: not valid JSON" in message
    assert "tampered/stage1 (tampered/stage1/checkpoints/best_mean.pth: " in message
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "mdfnet_hydra.evaluate",
            f"experiments_dir={root}",
            f"output_dir={tmp_path / 'cli'}",
            "evaluation.figures=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert cli.returncode == 1
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith("mdfnet_hydra.evaluate: error: none of the 2 run(s)") and "Traceback" not in cli.stderr, (
        cli.stderr[-3000:]
    )
    assert "half_written/stage1/metrics.json" in last and "tampered/stage1/checkpoints/best_mean.pth" in last
    assert not marker.exists()


def test_stages_that_never_finished_are_listed_as_left_out(tmp_path, caplog):
    """A job killed mid-stage leaves config.yaml and checkpoints but no metrics.json; a metrics.json
    may be deleted. Each such stage is left out by name (warning, results.md, results_summary.csv),
    never dropped silently; a job's own summary (<job>/metrics.json) and Hydra's record are no runs."""
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 14)) < 0.4).astype(np.float32)
    root = tmp_path / "experiments"
    config = {"seed": 1, "data": {"name": "synthetic"}}
    for name in ("good", "deleted_metrics"):
        fake_stage2(root, name, config, targets, np.arange(40) // 2)
    (root / "deleted_metrics" / "stage2" / "metrics.json").unlink()
    (root / "good" / "metrics.json").write_text(json.dumps({"objective": 0.5, "stages": {}}))  # the job's summary
    (root / "good" / ".hydra").mkdir()
    (root / "good" / ".hydra" / "config.yaml").write_text("seed: 1\n")
    killed = root / "killed" / "stage1"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "checkpoints" / "last.pth").write_bytes(b"state")
    OmegaConf.save(OmegaConf.create(config), killed / "config.yaml")
    first_epoch = root / "killed_in_first_epoch" / "stage1"  # no checkpoint yet
    first_epoch.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), first_epoch / "config.yaml")

    with caplog.at_level(logging.WARNING, logger="mdfnet_hydra"):
        result = evaluate(root, tmp_path / "results", options())
    incomplete = {"deleted_metrics/stage2", "killed/stage1", "killed_in_first_epoch/stage1"}
    assert result["runs"] == 1
    assert {item["run"] for item in result["left_out"]} == incomplete
    with (tmp_path / "results" / "results_summary.csv").open() as handle:
        rows = {r["run"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"good/stage2", *incomplete}
    markdown = (tmp_path / "results" / "results.md").read_text()
    for name in incomplete:
        why = f"{name}/metrics.json: incomplete: no metrics.json, training did not finish"
        assert rows[name]["left_out"].startswith(why) and rows[name]["predictions"] == "left out"
        assert f"| {name} | {name}/metrics.json | incomplete: no metrics.json, training did not finish" in markdown
        assert any(name in m and "incomplete" in m for m in caplog.messages), caplog.messages


# --- predictions files: atomic writes, no pickle, damage named ---------------------------------


def small_split(n=6):
    rng = np.random.default_rng(0)
    labels = (rng.random((n, 14)) < 0.4).astype(np.float32)
    frame = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)]})
    return SplitData("test", frame, labels, np.ones_like(labels), labels)


def test_save_predictions_is_atomic_and_round_trips(tmp_path):
    split = small_split()
    ckpt = tmp_path / "best_mean.pth"
    ckpt.write_bytes(b"weights")
    path = tmp_path / "predictions" / "test.npz"
    probs = np.linspace(0, 1, 6 * 14).reshape(6, 14)
    save_predictions(path, probs, split, np.arange(6), ckpt)
    first = path.stat().st_ino
    save_predictions(path, probs[::-1].copy(), split, np.arange(6), ckpt)
    assert path.stat().st_ino != first, "replaced by a rename, not rewritten in place"
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.npz"], "no .npz.npz, no temporaries left"
    preds = load_predictions(path)
    np.testing.assert_allclose(preds.probs, probs[::-1].astype(np.float32))
    assert list(preds.sample_id) == [f"s{i}" for i in range(6)] and list(preds.group) == [0, 0, 1, 1, 2, 2]
    assert preds.checkpoint_sha256 == file_digest(ckpt)


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncated", "BadZipFile"),
        ("empty", "EOFError"),
        ("objects", "Python objects"),
        ("npy", "not an .npz archive"),
        ("missing", "no group array"),
        ("shape", "probs is float32 (6, 13)"),
        ("soft targets", "targets holds values other than 0 and 1"),
        ("mask", "mask holds values other than 0 and 1"),
        ("nan", "probs holds NaN or infinite values"),
    ],
)
def test_damaged_predictions_name_the_file(tmp_path, damage, reason):
    split = small_split()
    ckpt = tmp_path / "best_mean.pth"
    ckpt.write_bytes(b"weights")
    path = tmp_path / "test.npz"
    save_predictions(path, np.full((6, 14), 0.5), split, np.arange(6), ckpt)
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    if damage == "truncated":
        truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "objects":
        arrays["group"] = arrays["group"].astype(object)
        np.savez(path, **arrays)
    elif damage == "npy":
        with path.open("wb") as handle:
            np.save(handle, arrays["probs"])
    elif damage == "missing":
        del arrays["group"]
        np.savez(path, **arrays)
    elif damage == "shape":
        arrays["probs"] = arrays["probs"][:, :13]
        np.savez(path, **arrays)
    elif damage in ("soft targets", "mask", "nan"):
        key, value = {"soft targets": ("targets", 0.3), "mask": ("mask", -1), "nan": ("probs", np.nan)}[damage]
        arrays[key][2, 3] = value
        np.savez(path, **arrays)
    with pytest.raises(DamagedFileError) as caught:
        load_predictions(path)
    message = str(caught.value)
    assert str(path) in message and reason in message and "delete the file" in message, message


# --- seed groups ---------------------------------------------------------------------------------


def fake_stage2(root, name, config, targets, groups, **metrics):
    """A stage-2 directory with `config` and saved predictions matching its (fake) checkpoint
    (`metrics`: more of its metrics.json)."""
    directory = root / name / "stage2"
    (directory / "checkpoints").mkdir(parents=True)
    ckpt = directory / "checkpoints" / "best_mean.pth"
    ckpt.write_bytes(name.encode())
    OmegaConf.save(OmegaConf.create(config), directory / "config.yaml")
    (directory / "metrics.json").write_text(
        json.dumps({"stage": "stage2", "modalities": ["vision"], "val": {"auroc_mean": 0.5}, **metrics})
    )
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n = len(targets)
    for split in ("val", "test"):
        probs = 1 / (1 + np.exp(-(2 * (targets - 0.5) + rng.normal(size=targets.shape))))
        (directory / "predictions").mkdir(exist_ok=True)
        np.savez(
            directory / "predictions" / f"{split}.npz",
            probs=probs.astype(np.float32),
            targets=targets,
            mask=np.ones_like(targets),
            sample_id=np.array([f"s{i:03d}" for i in range(n)]),
            group=groups,
            checkpoint_sha256=np.array(file_digest(ckpt)),
        )


def test_seed_groups_differ_in_the_seed_alone(trained, tmp_path):
    base = OmegaConf.to_container(OmegaConf.load(trained / "config.yaml"))
    base["stage"] = {"name": "stage2", "run": ["stage2"], "init_from": "/runs/a/stage1/checkpoints/best_mean.pth"}

    def variant(**changes):
        config = json.loads(json.dumps(base))
        for dotted, value in changes.items():
            node = config
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        config["paths"]["run_dir"] = f"/elsewhere/{len(json.dumps(changes))}"  # paths never matter
        return config

    configs = {
        "seed1": variant(seed=1),
        "seed2": variant(seed=2),
        # only bookkeeping differs besides the seed: same group
        "seed3_bookkeeping": variant(
            seed=3,
            **{
                "data.num_workers": 3,
                "data.pin_memory": True,
                "trainer.max_time": "1h",
                "trainer.log_every_n_steps": 50,
                "evaluation.n_bootstrap": 5,
                "paths.cache_dir": "/scratch/cache",
            },
        ),
        # two workers of 8 = one of 16 (same effective batch): same group
        "seed4_ddp": variant(seed=4, **{"trainer.nproc_per_node": 2, "trainer.batch_size": 8}),
        # started from another stage-1 checkpoint: its own group, even with seed 1 again
        "other_init": variant(seed=1, **{"stage.init_from": "/runs/b/stage1/checkpoints/best_mean.pth"}),
        # a larger effective batch: its own group
        "bigger_batch": variant(seed=2, **{"trainer.nproc_per_node": 2}),
    }
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 14)) < 0.4).astype(np.float32)
    root = tmp_path / "experiments"
    for name, config in configs.items():
        fake_stage2(root, name, config, targets, np.arange(40) // 2)

    runs = {r.name.split("/")[0]: r for r in discover(root)}
    assert runs["seed1"].signature() == runs["seed2"].signature()
    assert runs["other_init"].signature() != runs["seed1"].signature()

    result = evaluate(root, tmp_path / "results", options())
    assert result["runs"] == 6 and result["left_out"] == []
    markdown = (tmp_path / "results" / "results.md").read_text()
    seeds = markdown.split("## Seeds")[1]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in seeds.splitlines() if line.startswith("| vision/")
    ]
    by_runs = {row[1]: row for row in rows}
    assert set(by_runs) == {
        "seed1/stage2, seed2/stage2, seed3_bookkeeping/stage2, seed4_ddp/stage2",
        "other_init/stage2",
        "bigger_batch/stage2",
    }, rows
    assert by_runs["seed1/stage2, seed2/stage2, seed3_bookkeeping/stage2, seed4_ddp/stage2"][2] == "1, 2, 3, 4"
    assert "stage.init_from=/runs/b/stage1/checkpoints/best_mean.pth" in by_runs["other_init/stage2"][0]
    assert "(effective batch)=64" in by_runs["bigger_batch/stage2"][0]


def test_a_run_stopped_by_its_time_budget_is_no_seed_of_runs_that_trained_every_epoch(trained, tmp_path):
    config = OmegaConf.to_container(OmegaConf.load(trained / "config.yaml"))
    config["stage"] = {"name": "stage2", "run": ["stage2"], "init_from": None}
    config["phases"]["stage2"]["epochs"] = 3
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 14)) < 0.4).astype(np.float32)
    root = tmp_path / "experiments"
    for seed in (1, 2, 3):
        stopped = {"stopped_by": "max_time", "epochs_run": 1} if seed == 3 else {"epochs_run": 3}
        fake_stage2(root, f"seed{seed}", {**config, "seed": seed}, targets, np.arange(40) // 2, **stopped)
    evaluate(root, tmp_path / "results", options())
    seeds = (tmp_path / "results" / "results.md").read_text().split("## Seeds")[1]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in seeds.splitlines() if line.startswith("| vision/")
    ]
    by_runs = {row[1]: row[0] for row in rows}
    assert set(by_runs) == {"seed1/stage2, seed2/stage2", "seed3/stage2"}, rows
    assert "(stopped by trainer.max_time)=after 1 of 3 epochs" in by_runs["seed3/stage2"]


def test_runs_behind_symbolic_links_are_found_once_and_keep_their_link_names(trained, tmp_path):
    """A folder of links to runs elsewhere (several sweeps gathered for one comparison): each linked
    run is evaluated under its link's name; a link to a run already found and a link back up (a
    loop) add nothing."""
    from mdfnet_hydra.evaluation.inputs import stage_directories

    elsewhere = tmp_path / "sweeps"
    copy_run(trained, elsewhere, "a")
    copy_run(trained, elsewhere, "b")
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    (gathered / "first").symlink_to(elsewhere / "a")
    (gathered / "second").symlink_to(elsewhere / "b")
    (gathered / "again").symlink_to(elsewhere / "b")
    (gathered / "loop").symlink_to(gathered)
    found = stage_directories(gathered)
    assert [d.relative_to(gathered).as_posix() for d in found] == ["again/stage1", "first/stage1"]
    result = evaluate(gathered, tmp_path / "results", options())
    assert result["runs"] == 2


def test_runs_whose_names_differ_only_in_punctuation_get_figures_of_their_own(trained, tmp_path):
    """`seed=1` and `seed_1` (sweep directory names) would share a figure's file name: each run's
    confusion matrices are its own file; names without a clash keep their plain slug."""
    from mdfnet_hydra.evaluation.figures import file_names

    names = file_names(["seed=1/stage1", "seed_1/stage1", "all/stage1"])
    assert names["all/stage1"] == "all_stage1"
    assert names["seed=1/stage1"] != names["seed_1/stage1"]
    assert all(names[n].startswith("seed_1_stage1-") for n in ("seed=1/stage1", "seed_1/stage1"))
    root = tmp_path / "experiments"
    copy_run(trained, root, "seed=1")
    copy_run(trained, root, "seed_1")
    evaluate(root, tmp_path / "results", options(figures=True))
    assert len(list((tmp_path / "results" / "confusion").glob("*.png"))) == 2


def test_a_data_root_whose_split_holds_other_cases_is_noted(trained, tmp_path):
    """data_root= is the run's own dataset, moved; one whose test split holds other cases than the
    run saved predictions for (another dataset, or another version) is evaluated, and the run's notes
    say so; the dataset itself, moved, gives no note."""
    root = tmp_path / "experiments"
    copy_run(trained, root, "run")
    state = torch.load(root / "run" / "stage1" / "checkpoints" / "best_mean.pth", weights_only=True)
    dataset = Path(state["config"]["data"]["root"])
    moved, other = tmp_path / "moved", tmp_path / "other"
    for copy in (moved, other):
        copy.mkdir()
        (copy / "images").symlink_to(dataset / "images")
        shutil.copy(dataset / "manifest.parquet", copy / "manifest.parquet")
    manifest = pd.read_parquet(other / "manifest.parquet")
    test_rows = manifest.index[manifest.split == "test"]
    manifest.drop(test_rows[: len(test_rows) // 2]).to_parquet(other / "manifest.parquet")  # another version
    notes = {}
    for name, data_root in (("moved", moved), ("other", other)):
        evaluate(root, tmp_path / f"results_{name}", options(), str(data_root))
        (row,) = [r for r in csv.DictReader((tmp_path / f"results_{name}" / "results_summary.csv").open()) if r["run"]]
        notes[name] = row["notes"]
    assert "data_root=" not in notes["moved"], notes["moved"]
    assert f"data_root={other}: its test split has" in notes["other"]
    assert "not the dataset the run was trained and saved on" in notes["other"]
