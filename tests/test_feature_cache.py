"""The frozen-encoder feature cache: same training result as recomputing, invalidated by any input
that changes the encoders' outputs, shared safely by concurrent jobs, never used where invalid."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_encoders import open_clip_dir, save_hf_encoder  # noqa: F401 - a fixture used here

from conftest import make_cfg, run_cli
from mdfnet_hydra.checkpoint import load_checkpoint
from mdfnet_hydra.data import cache_store, feature_cache
from mdfnet_hydra.data.dataset import load_splits
from mdfnet_hydra.data.feature_cache import FeatureArrays, cache_key, open_or_build
from mdfnet_hydra.data.preprocessing import Preprocessing
from mdfnet_hydra.models.mdfnet import build_model
from mdfnet_hydra.pipeline import run
from mdfnet_hydra.runtime import seed_everything

STAGE1 = [
    "stage=stage1",
    "modality=all",
    "data.small_sample=160",
    "phases.stage1.epochs=3",
    "phases.stage1.warmup_epochs=1",
    "trainer.limit_train_batches=null",
    "trainer.limit_val_batches=null",
    "evaluation.on_finish=false",
]


def train(tmp_path: Path, name: str, output_root: Path, *overrides: str) -> tuple[dict, dict]:
    cfg = make_cfg([*STAGE1, f"paths.cache_dir={tmp_path / 'cache'}", *overrides], tmp_path / name, output_root)
    summary = run(cfg)
    stage = tmp_path / name / "stage1"
    weights = load_checkpoint(stage / "checkpoints" / "last.pth")["model"]
    return {**summary["stages"]["stage1"], "log": (tmp_path / name / "logs" / "train.log").read_text()}, weights


def cache_dirs(root: Path) -> set[str]:
    """The feature caches under `root` (token ids, under tokens/, are data/token_cache.py's)."""
    return {f"{p.parent.name}/{p.name}" for p in root.glob("*/*") if p.is_dir() and p.parent.name != "tokens"}


def count_lines(log: str, *words: str) -> int:
    return sum(all(w in line for w in words) for line in log.splitlines())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, output_root):
    tmp = tmp_path_factory.mktemp("nocache")
    return train(tmp, "run", output_root, "data.feature_cache=false")


def test_float32_cache_trains_exactly_like_recomputing(reference, tmp_path, output_root):
    expected, expected_weights = reference
    assert "inputs encoded every step (data.feature_cache=false)" in expected["log"]
    result, weights = train(tmp_path, "run", output_root, "data.feature_cache_dtype=float32")
    assert "feature cache vision/train" in result["log"] and "feature cache text/train" in result["log"]
    assert result["val"]["auroc_mean"] == pytest.approx(expected["val"]["auroc_mean"], abs=1e-4)
    assert result["test"]["loss"] == pytest.approx(expected["test"]["loss"], rel=1e-4)
    for key, value in expected_weights.items():
        torch.testing.assert_close(weights[key], value, atol=1e-4, rtol=1e-3, msg=key)


def test_float16_cache_stays_within_half_precision_of_recomputing(reference, tmp_path, output_root):
    expected, expected_weights = reference
    result, weights = train(tmp_path, "run", output_root)  # the default: float16
    stored = np.load(next((tmp_path / "cache" / "vision").glob("*/features.npy")), mmap_mode="r")
    assert stored.dtype == np.float16
    assert result["val"]["auroc_mean"] == pytest.approx(expected["val"]["auroc_mean"], abs=0.02)
    assert result["test"]["loss"] == pytest.approx(expected["test"]["loss"], rel=0.02)
    head = "head.4.weight"
    assert (weights[head] - expected_weights[head]).abs().max() < 0.02 * expected_weights[head].abs().max()
    # the frozen encoders themselves are untouched and identical either way
    vision = [k for k in weights if k.startswith("encoders.vision")]
    assert vision and all(torch.equal(weights[k], expected_weights[k]) for k in vision)


def test_cached_features_are_the_encoder_outputs(tmp_path, output_root):
    """Reading the cache gives what the frozen encoders compute on the same samples."""
    cfg = make_cfg(
        [*STAGE1, f"paths.cache_dir={tmp_path / 'cache'}", "data.feature_cache_dtype=float32"],
        tmp_path / "r",
        output_root,
    )
    root, splits = load_splits(cfg.data, int(cfg.seed))
    prep = Preprocessing.create(cfg.model, ["vision", "text"], splits["train"])
    seed_everything(0)
    model = build_model(cfg.model, ["vision", "text"], 0, prep.tokenizer)
    model.set_encoders_frozen(True)
    dataset = prep.dataset(splits["val"], root, cfg.model)
    from mdfnet_hydra.runtime import Runtime

    runtime = Runtime.from_config(cfg.trainer)
    cached = feature_cache.cached_datasets(model, {"val": dataset}, cfg, runtime, prep.pad_id)["val"]
    from mdfnet_hydra.data.dataset import Collator

    rows = [5, 0, 17, 3]
    live = model.encode(Collator(prep.pad_id)([dataset[i] for i in rows]))
    batch = cached.__getitems__(rows)
    torch.testing.assert_close(batch["vision_features"], live["vision"][0], atol=1e-5, rtol=1e-4)
    width = batch["text_features"].shape[1]
    assert width == live["text"][0].shape[1], "trimmed to the batch's longest text"
    valid = ~batch["text_padding"]
    assert torch.equal(valid, ~live["text"][1])
    torch.testing.assert_close(batch["text_features"][valid], live["text"][0][valid], atol=1e-4, rtol=1e-3)


def _keys(cfg, output_root, seed: int = 0):
    root, splits = load_splits(cfg.data, int(cfg.seed))
    prep = Preprocessing.create(cfg.model, ["vision", "text"], splits["train"])
    seed_everything(seed)
    model = build_model(cfg.model, ["vision", "text"], 0, prep.tokenizer)
    dataset = prep.dataset(splits["train"], root, cfg.model)
    from mdfnet_hydra.config import to_plain

    return {
        m: cache_key(model.encoders[m], to_plain(cfg.model[m]), dataset, m, "fp32", "float16")
        for m in ("vision", "text")
    }


def test_a_changed_input_changes_the_key(tmp_path, output_root):
    data = tmp_path / "data"
    base = make_cfg(STAGE1, tmp_path / "r", output_root)
    root, _ = load_splits(base.data, 0)
    shutil.copytree(root, data)
    cfg = make_cfg(
        [*STAGE1, "data=processed", f"data.root={data}", "data.small_sample=160"], tmp_path / "r", output_root
    )
    original = _keys(cfg, output_root)
    assert original == _keys(cfg, output_root), "the key is a pure function of the inputs"

    assert _keys(cfg, output_root, seed=1) != original, "other encoder weights"
    other_length = _keys(
        make_cfg(
            [*STAGE1, "data=processed", f"data.root={data}", "data.small_sample=160", "model.text.max_length=16"],
            tmp_path / "r",
            output_root,
        ),
        output_root,
    )
    assert other_length["text"] != original["text"] and other_length["vision"] == original["vision"]
    other_size = _keys(
        make_cfg(
            [
                *STAGE1,
                "data=processed",
                f"data.root={data}",
                "data.small_sample=160",
                "model.vision.image_size=48",
                "model.vision.open_clip_config.vision_cfg.image_size=48",
            ],
            tmp_path / "r",
            output_root,
        ),
        output_root,
    )
    assert other_size["vision"] != original["vision"], "another image transform"

    manifest = pd.read_parquet(data / "manifest.parquet")
    train_rows = manifest.index[manifest["split"] == "train"]
    manifest.loc[train_rows, "text"] = manifest.loc[train_rows, "text"] + " no acute change since the prior study."
    manifest.to_parquet(data / "manifest.parquet")
    edited = _keys(cfg, output_root)
    assert edited["text"] != original["text"], "the manifest's text changed"

    for path in manifest.loc[train_rows, "image_path"]:  # same paths, new pixels
        with Image.open(data / path) as image:
            pixels = 255 - np.asarray(image)
        Image.fromarray(pixels).save(data / path)
    assert _keys(cfg, output_root)["vision"] != edited["vision"], "the image files changed"


def _pretrained_key(directory: Path, modality: str, tmp_path: Path, output_root: Path) -> str:
    """The cache key of a pretrained encoder loaded from `directory` as a job loads it."""
    from mdfnet_hydra.config import to_plain

    if modality == "text":
        chosen = ["model/text=clinical_modernbert", f"model.text.name_or_path={directory}", "model.text.max_length=64"]
    else:
        chosen = [
            "model/vision=biomedclip",
            f"model.vision.name_or_path=local-dir:{directory}",
            "model.vision.image_size=64",
            "model.vision.output=pooled",
        ]
    cfg = make_cfg(["debug=fast", "stage=stage1", f"modality={modality}", *chosen], tmp_path / "r", output_root)
    root, splits = load_splits(cfg.data, int(cfg.seed))
    prep = Preprocessing.create(cfg.model, [modality], splits["train"])
    model = build_model(cfg.model, [modality], 0, prep.tokenizer)
    dataset = prep.dataset(splits["val"], root, cfg.model)
    return cache_key(model.encoders[modality], to_plain(cfg.model[modality]), dataset, modality, "fp32", "float16")


def _edit_json(path: Path, edit) -> None:
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_a_text_model_config_edited_in_place_changes_the_key(tmp_path, output_root):
    """config.json's hidden_act / layer_norm_eps change the outputs, not the weights: another cache."""
    directory = tmp_path / "bert"
    save_hf_encoder(directory, "bert")
    original = _pretrained_key(directory, "text", tmp_path, output_root)
    assert _pretrained_key(directory, "text", tmp_path, output_root) == original, "the directory as it was"
    weights = (directory / "model.safetensors").read_bytes()
    _edit_json(directory / "config.json", lambda c: c.update(hidden_act="relu"))
    relu = _pretrained_key(directory, "text", tmp_path, output_root)
    assert relu != original
    _edit_json(directory / "config.json", lambda c: c.update(layer_norm_eps=10.0))
    assert _pretrained_key(directory, "text", tmp_path, output_root) not in (original, relu)
    assert (directory / "model.safetensors").read_bytes() == weights


def test_an_open_clip_model_config_edited_in_place_changes_the_key(tmp_path, output_root, open_clip_dir):  # noqa: F811
    """open_clip_config.json's timm_pool changes the pooled output, not the weights: another cache."""
    directory = tmp_path / "biomedclip"
    shutil.copytree(open_clip_dir[0], directory)
    original = _pretrained_key(directory, "vision", tmp_path, output_root)
    assert _pretrained_key(directory, "vision", tmp_path, output_root) == original, "the directory as it was"
    _edit_json(directory / "open_clip_config.json", lambda c: c["model_cfg"]["vision_cfg"].update(timm_pool="avg"))
    assert _pretrained_key(directory, "vision", tmp_path, output_root) != original


def _build_concurrently(root: str, key: str, marker: str, barrier, use_lock: bool) -> str:
    import time as _time

    if not use_lock:
        cache_store.exclusive = lambda path: __import__("contextlib").nullcontext()

    def build(tmp: Path) -> None:
        with open(marker, "a") as handle:
            handle.write("built\n")
        array = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16, shape=(64, 4, 8))
        for i in range(64):
            array[i] = i
            _time.sleep(0.005)
        array.flush()
        (tmp / "meta.json").write_text(json.dumps({"rows": 64, "shape": [64, 4, 8]}))

    barrier.wait()
    cache, _ = open_or_build(Path(root), "vision", key, build)
    return float(np.asarray(cache.features).sum())


@pytest.mark.parametrize("use_lock", [True, False], ids=["locked", "without-working-locks"])
def test_concurrent_builders_share_one_complete_cache(tmp_path, use_lock):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(3)
    marker = tmp_path / "builds.txt"
    with ctx.Pool(3) as pool:
        sums = pool.starmap(_build_concurrently, [(str(tmp_path), "k" * 32, str(marker), barrier, use_lock)] * 3)
    expected = float(sum(i * 32 for i in range(64)))
    assert sums == [expected] * 3, "every job reads the complete cache"
    builds = marker.read_text().count("built")
    if use_lock:
        assert builds == 1, "one job builds, the others wait and read"
    else:
        assert 1 <= builds <= 3, "without locks several may build; the atomic rename keeps one complete copy"
    left = {p.name for p in (tmp_path / "vision").iterdir()}
    assert left == ({"k" * 32, "k" * 32 + ".lock"} if use_lock else {"k" * 32}), "no temporary directories left behind"
    assert FeatureArrays(tmp_path / "vision" / ("k" * 32)).features.shape == (64, 4, 8)


@pytest.mark.slow  # 16 s: two training processes at once
def test_two_concurrent_training_jobs_share_the_cache(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    common = [
        "debug=fast",
        "stage=stage1",
        "modality=vision_text",
        "data.synthetic.num_samples=300",
        "data.synthetic.image_size=32",
        f"paths.root={tmp_path}",
        "evaluation.on_finish=false",
    ]
    run_cli(*common, f"hydra.run.dir={tmp_path / 'warmup'}", "data.feature_cache=false")  # the dataset exists first
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mdfnet_hydra.train",
                *common,
                f"hydra.run.dir={tmp_path / f'job{i}'}",
                f"phases.stage1.lr={lr}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, lr in enumerate((1e-3, 3e-3))
    ]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert len(cache_dirs(tmp_path / "cache")) == 6, "one cache per encoder and split, shared by both jobs"
    logs = [(tmp_path / f"job{i}" / "logs" / "train.log").read_text() for i in range(2)]
    assert sum(count_lines(log, "feature cache", ": built in") for log in logs) == 6, "each cache built once"
    assert sum(count_lines(log, "feature cache", ": reused in") for log in logs) == 6, "and read by the other job"
    warmup = (tmp_path / "warmup" / "logs" / "train.log").read_text()
    assert count_lines(warmup, "token ids", ": built in") == 3, "the first job tokenises each split once"
    assert [count_lines(log, "token ids", ": reused in") for log in logs] == [3, 3], "later jobs read its token ids"
    for i in range(2):
        assert json.loads((tmp_path / f"job{i}" / "metrics.json").read_text())["objective"] is not None


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["stage=stage2"], "the encoders train in this phase"),
        (["stage=stage1", "data.augment=true"], "data.augment=true: training inputs are random"),
    ],
)
def test_cache_is_never_used_where_invalid(tmp_path, output_root, overrides, reason):
    cfg = make_cfg(
        [
            "debug=fast",
            "modality=vision_clinical",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "evaluation.on_finish=false",
            *overrides,
        ],
        tmp_path / "run",
        output_root,
    )
    run(cfg)
    stage = overrides[0].split("=")[1]
    assert f"{stage}: inputs encoded every step ({reason})" in (tmp_path / "run" / "logs" / "train.log").read_text()
    assert not (tmp_path / "cache").exists()


def test_stage1_from_a_cache_held_on_the_device_trains_exactly_as_from_the_memory_map(
    tmp_path, output_root, monkeypatch
):
    """The same batches in the same order: identical weights and metrics, whichever way the cache
    is read (here the device is the CPU; the GPU check measures it on a GPU). The stage gives the
    memory back when it ends, for stage 2 and the evaluation."""
    released = []
    release = feature_cache.CachedFeatureDataset.release

    def spy(self):
        released.append(self.resident_device)
        release(self)

    monkeypatch.setattr(feature_cache.CachedFeatureDataset, "release", spy)
    mapped, mapped_weights = train(tmp_path, "mapped", output_root)
    assert released == [None, None, None]
    held, held_weights = train(tmp_path, "held", output_root, "data.feature_cache_on_device=true")
    assert released[3:] == [torch.device("cpu")] * 3, "train, val and test let go of their memory"
    assert "held on cpu" not in mapped["log"] and count_lines(held["log"], "feature cache", "held on cpu") == 3
    assert "gathered on cpu from the feature cache held there" in held["log"]
    assert held["val"]["auroc_mean"] == mapped["val"]["auroc_mean"]
    assert held_weights.keys() == mapped_weights.keys()
    for key, value in mapped_weights.items():
        assert torch.equal(held_weights[key], value), key
