"""Report token ids padded to a few fixed lengths (`model.text.length_buckets`), so a compiled step
sees few shapes: padding never changes what the model computes, from raw tokens or from the
feature cache, and a list that cannot hold `max_length` is refused at start."""

from __future__ import annotations

import pytest
import torch

from mdfnet_hydra.config import ConfigError, validate_config
from mdfnet_hydra.data import feature_cache
from mdfnet_hydra.data.dataset import Collator, load_splits, padded_length
from mdfnet_hydra.data.preprocessing import Preprocessing
from mdfnet_hydra.models.mdfnet import build_model
from mdfnet_hydra.runtime import Runtime, seed_everything

BUCKETS = (16, 32, 64, 128)


def token_rows(*lengths: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.arange(1, n + 1), "targets": torch.zeros(14)} for n in lengths]


def test_a_batch_is_padded_up_to_the_smallest_bucket_that_holds_its_longest_report():
    batch = Collator(pad_id=0, buckets=BUCKETS)(token_rows(3, 20))
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"].sum(1).tolist() == [3, 20]
    assert torch.equal(batch["input_ids"][1, :20], torch.arange(1, 21)) and not batch["input_ids"][1, 20:].any()
    assert Collator(pad_id=0)(token_rows(3, 20))["input_ids"].shape == (2, 20), "no buckets: the batch's longest"
    assert [padded_length(n, BUCKETS) for n in (1, 16, 17, 128)] == [16, 16, 32, 128]


def job_parts(cfg):
    root, splits = load_splits(cfg.data, int(cfg.seed))
    prep = Preprocessing.create(cfg.model, ["vision", "text", "clinical"], splits["train"])
    seed_everything(0)
    model = build_model(cfg.model, ["vision", "text", "clinical"], prep.clinical_dim, prep.tokenizer).eval()
    return model, prep.dataset(splits["val"], root, cfg.model), prep


@torch.no_grad()
def test_bucket_padding_gives_the_logits_of_unpadded_reports(cfg_factory):
    """Each report alone (no padding at all) and the same reports in one batch padded to a bucket:
    the full model's logits agree to float32 rounding."""
    cfg = cfg_factory("modality=all", "model.text.length_buckets=[16,32,64,128]")
    model, dataset, prep = job_parts(cfg)
    rows = [dataset[i] for i in range(6)]
    bucketed = Collator(prep.pad_id, cfg.model.text.length_buckets)(rows)
    lengths = bucketed["attention_mask"].sum(1)
    assert bucketed["input_ids"].shape[1] == padded_length(int(lengths.max()), BUCKETS) > int(lengths.min())
    alone = torch.cat([model(Collator(prep.pad_id)([row])) for row in rows])
    torch.testing.assert_close(model(bucketed), alone, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_cached_text_features_are_padded_to_the_bucket_without_changing_the_logits(cfg_factory, tmp_path):
    """Stage 1 from the feature cache: text features come padded to the batch's bucket (past the
    split's longest report too), and the fusion's logits equal those from the trimmed batch."""
    cfg = cfg_factory("modality=all", f"paths.cache_dir={tmp_path / 'cache'}", "data.feature_cache_dtype=float32")
    model, dataset, prep = job_parts(cfg)
    model.set_encoders_frozen(True)
    runtime = Runtime.from_config(cfg.trainer)
    trimmed = feature_cache.cached_datasets(model, {"train": dataset}, cfg, runtime, prep.pad_id)["train"]
    cfg.model.text.length_buckets = [8, 256]  # 256: longer than any cached report
    cached = feature_cache.cached_datasets(model, {"train": dataset, "val": dataset}, cfg, runtime, prep.pad_id)
    bucketed = cached["train"]  # (the cache of the validation split trains no compiled step: trimmed)
    assert (
        cached["val"].__getitems__([4, 1, 9])["text_padding"].shape
        == trimmed.__getitems__([4, 1, 9])["text_padding"].shape
    )
    cached = [d for d in (tmp_path / "cache" / "text").iterdir() if d.is_dir()]
    assert len(cached) == 1, "buckets shape batches, not features: the cache is reused, not rebuilt"
    rows = [4, 1, 9]
    short, long = trimmed.__getitems__(rows), bucketed.__getitems__(rows)
    assert long["text_features"].shape[1] == long["text_padding"].shape[1] == 256
    assert torch.equal(long["text_padding"].sum(1), short["text_padding"].sum(1) + 256 - short["text_padding"].shape[1])
    torch.testing.assert_close(model(long), model(short), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "buckets, message",
    [
        ("[32,64]", "largest (64) is shorter than model.text.max_length (128)"),
        ("[64,32,128]", "must be increasing positive lengths"),
        ("[0,128]", "must be increasing positive lengths"),
    ],
)
def test_buckets_that_cannot_hold_every_report_are_refused_at_start(cfg_factory, buckets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg_factory(f"model.text.length_buckets={buckets}"))
    validate_config(cfg_factory("model.text.length_buckets=[32,64,128]"))


# ---------------------------------------------------------------- the compiled step
def test_bucketed_reports_compile_once_per_bucket_and_a_shape_past_them_fails(cfg_factory):
    """Batches of many report lengths in two buckets: two graphs and no recompile after them; a
    third shape (buckets bypassed) stops the step with an error instead of running eagerly."""
    import torch._dynamo

    from mdfnet_hydra.compiling import CompilePlan, compile_counts, compile_forward, compiled_step

    cfg = cfg_factory("modality=text")
    root, splits = load_splits(cfg.data, int(cfg.seed))
    prep = Preprocessing.create(cfg.model, ["text"], splits["train"])
    model = build_model(cfg.model, ["text"], 0, prep.tokenizer).eval()
    dataset = prep.dataset(splits["train"], root, cfg.model)
    by_length = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    short, long = by_length[:12], by_length[-12:]
    split = len(dataset[short[-1]]["input_ids"])  # the short reports' bucket
    assert split < len(dataset[long[0]]["input_ids"])
    buckets = [split, int(cfg.model.text.max_length)]
    collate = Collator(prep.pad_id, buckets)
    batches = [collate([dataset[i] for i in rows[j : j + 4]]) for rows in (short, long) for j in (0, 4, 8)]
    assert len({tuple(b["input_ids"].shape) for b in batches}) == 2
    assert len({int(b["attention_mask"].sum(1).max()) for b in batches}) > 2, "many lengths, two buckets"
    torch._dynamo.reset()
    plan = CompilePlan.of("default", buckets, backend="eager")
    forward = compile_forward(model, plan)
    start = compile_counts()
    with torch.no_grad():
        for batch in batches:
            with compiled_step(plan, batch):  # as the trainer runs its steps
                forward(batch)
        assert compile_counts()["graphs"] - start["graphs"] == 2
        assert compile_counts()["graph_breaks"] == start["graph_breaks"]
        unbucketed = Collator(prep.pad_id)([dataset[i] for i in long[:4]])
        with pytest.raises(RuntimeError, match=r"one more compiled graph than the 2 allowed, one per model.text"):
            with compiled_step(plan, unbucketed):
                forward(unbucketed)
        forward(unbucketed)  # outside the training step torch's own rules hold: a third graph


@pytest.mark.parametrize("kernel", ["eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
@torch.no_grad()
def test_every_attention_kernel_gives_the_text_features_of_sdpa(cfg_factory, kernel):
    """`model.text.attention`: the same report features on the real tokens (the padding masked out,
    and the sliding window of ModernBERT's local layers) as the default SDPA kernel."""
    from mdfnet_hydra.models.text import build_text_encoder

    # local layers with a window shorter than the reports, so the sliding-window mask matters
    window = ["model.text.model_config.global_attn_every_n_layers=2", "+model.text.model_config.local_attention=8"]
    outputs = {}
    for name in ("sdpa", kernel):
        cfg = cfg_factory("modality=text", f"model.text.attention={name}", *window)
        _, dataset, prep = job_parts(cfg)
        batch = Collator(prep.pad_id, [64])([dataset[i] for i in range(8)])
        seed_everything(0)
        encoder = build_text_encoder(cfg.model.text, prep.tokenizer).eval()
        assert encoder.backbone.config._attn_implementation == name
        tokens, padding = encoder(batch["input_ids"], batch["attention_mask"])
        outputs[name] = tokens[~padding]
    assert int(batch["attention_mask"].sum(1).max()) > 8, "reports longer than the window"
    torch.testing.assert_close(outputs[kernel], outputs["sdpa"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.compile=true", "trainer.compile_mode=reduce_overhead"], "records a CUDA graph for every report"),
        (["trainer.compile=true", "trainer.compile_mode=max_autotune"], "max_autotune records a CUDA graph for"),
        (["model.text.attention=flash_attention_2"], "needs the flash-attn package"),
        (["model.text.attention=flash_attention_2", "trainer.precision=fp32"], "not with trainer.precision=fp32"),
    ],
)
def test_ways_of_running_the_text_encoder_that_cannot_work_are_refused_at_start(cfg_factory, overrides, message):
    import importlib.util

    if "flash-attn" in message and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed on this machine")
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg_factory("modality=all", *overrides))
    validate_config(cfg_factory("modality=all", "trainer.compile=true", "trainer.compile_mode=reduce_overhead",
                                "model.text.length_buckets=[64,128]"))  # fmt: skip
    validate_config(cfg_factory("modality=vision", *overrides[:2]))  # no text: nothing to refuse


@pytest.mark.parametrize("buckets", [[], [8, 256]], ids=["trimmed", "bucketed-past-the-cache"])
def test_a_cache_held_in_device_memory_gives_the_memory_mapped_batches(cfg_factory, tmp_path, buckets, monkeypatch):
    """`data.feature_cache_on_device=true` (here the CPU's memory: the same code path as a GPU's):
    every key of every batch equals the memory-mapped read, in sampler order, with the same text
    width; the loader then runs no workers and pins nothing, whatever data.* asks. The arrays are
    copied over in chunks of rows (here of one row each)."""
    from mdfnet_hydra.data.loading import describe_loader, loader_settings

    monkeypatch.setattr(feature_cache, "HOLD_CHUNK_BYTES", 1)  # one row per copy

    cfg = cfg_factory(
        "modality=all",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"model.text.length_buckets={buckets}".replace(" ", ""),
        "data.num_workers=2",
        "data.pin_memory=true",
    )
    model, dataset, prep = job_parts(cfg)
    model.set_encoders_frozen(True)
    runtime = Runtime.from_config(cfg.trainer)
    mapped = feature_cache.cached_datasets(model, {"train": dataset}, cfg, runtime, prep.pad_id)["train"]
    assert mapped.resident_device is None, "auto holds nothing on a CPU"
    cfg.data.feature_cache_on_device = True
    held = feature_cache.cached_datasets(model, {"train": dataset}, cfg, runtime, prep.pad_id)["train"]
    assert held.resident_device == torch.device("cpu") and held.nbytes > 0
    for rows in ([4, 1, 9], [0], [13, 2, 7, 2, 11]):
        expected, got = mapped.__getitems__(rows), held.__getitems__(rows)
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    settings = loader_settings(cfg.data, runtime, held)
    assert settings["num_workers"] == 0 and settings["pin_memory"] is False
    loader = torch.utils.data.DataLoader(held, batch_size=4, collate_fn=Collator(prep.pad_id), **settings)
    assert describe_loader(loader) == "gathered on cpu from the feature cache held there (no workers)"
    assert torch.equal(next(iter(loader))["vision_features"], mapped.__getitems__([0, 1, 2, 3])["vision_features"])
    held.release()  # the memory goes back; reads are memory-mapped again, with the same batches
    assert held.resident_device is None and torch.equal(
        held.__getitems__([4, 1, 9])["vision_features"], mapped.__getitems__([4, 1, 9])["vision_features"]
    )
