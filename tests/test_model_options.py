"""Model options that trained something else than asked, or crashed late in torch / timm /
torchvision, refused at start or at model build in one line (or, for a working but unusual
choice, said in the log): report lengths, image normalisation, image sizes, the text kernel and
pooling."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from hydra.errors import ConfigCompositionException
from test_encoders import TEXTS, open_clip_dir  # noqa: F401 (the fixture: a BiomedCLIP-shaped local-dir at 64 px)

from conftest import SMALL_DATA, run_cli
from mdfnet_hydra.config import ConfigError, validate_config
from mdfnet_hydra.models.text import build_text_encoder, train_wordpiece
from mdfnet_hydra.models.vision import build_image_transform, build_vision_encoder


@pytest.mark.parametrize("length", [1, 2])
def test_a_max_length_without_room_for_a_word_is_refused(cfg_factory, length):
    """1 turned truncation off (the tokenizer cannot fit [CLS] [SEP] in 1 and returns whole
    reports), 2 made every report [CLS] [SEP]."""
    with pytest.raises(ConfigError, match=rf"model.text.max_length must be >= 3 \(.*\), got {length}"):
        validate_config(cfg_factory("model.text.max_length=" + str(length), "model.text.length_buckets=[]"))
    validate_config(cfg_factory("model.text.max_length=3", "model.text.length_buckets=[]"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.vision.mean=[0.5,0.5]", "model.vision.mean must be 3 values (one per RGB channel), got [0.5, 0.5]"),
        ("model.vision.mean=[0.5,0.5,0.5,0.5]", "model.vision.mean must be 3 values"),
        ("model.vision.std=[0.2,0.2]", "model.vision.std must be 3 positive values"),
        ("model.vision.std=[0.2,0,0.2]", "model.vision.std must be 3 positive values (one per RGB channel)"),
        ("model.vision.std=[0.2,-0.1,0.2]", "model.vision.std must be 3 positive values"),
    ],
)
def test_a_normalisation_torchvision_cannot_apply_is_refused_at_start(cfg_factory, override, message):
    """It crashed in torchvision's Normalize while the feature cache was built (a zero std divides by 0)."""
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg_factory(override))
    assert message in str(refused.value)


def test_a_normalisation_error_is_one_line_before_any_data(tmp_path):
    result = run_cli("debug=fast", "model.vision.std=[0.2,0,0.2]", f"paths.root={tmp_path}", *SMALL_DATA)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "mdfnet_hydra.train: error: invalid configuration: model.vision.std must be 3 positive values "
        "(one per RGB channel), got [0.2, 0.0, 0.2]"
    )
    assert not list(tmp_path.glob("*/*")), "no data generated, no run directory"


def with_preprocess(directory, target, preprocess: dict):
    """A copy of the open_clip directory with another preprocess_cfg."""
    shutil.copytree(directory, target)
    config = json.loads((target / "open_clip_config.json").read_text())
    config["preprocess_cfg"] = preprocess
    (target / "open_clip_config.json").write_text(json.dumps(config))
    return target


def pretrained(cfg_factory, directory, *overrides: str):
    return cfg_factory(
        "model/vision=biomedclip",
        f"model.vision.name_or_path=local-dir:{directory}",
        "model.vision.image_size=64",
        *overrides,
    ).model.vision


def test_a_normalisation_a_pretrained_directory_would_ignore_is_refused(cfg_factory, tmp_path, open_clip_dir):  # noqa: F811
    """The directory's preprocess_cfg was used while the override still changed the run's
    identity and feature cache key. Its own values, or the defaults, are accepted."""
    own = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7]}
    directory = with_preprocess(open_clip_dir[0], tmp_path / "custom", own)
    with pytest.raises(ConfigError) as refused:
        build_image_transform(pretrained(cfg_factory, directory, "model.vision.mean=[0.5,0.5,0.5]"))
    assert str(refused.value) == (
        f"model.vision.mean=[0.5, 0.5, 0.5] is not used: the pretrained local-dir:{directory} normalises with its "
        "open_clip_config.json's preprocess_cfg.mean [0.1, 0.2, 0.3]; leave model.vision.mean unset"
    )
    with pytest.raises(ConfigError, match="model.vision.std=.* is not used"):
        build_image_transform(pretrained(cfg_factory, directory, "model.vision.std=[0.3,0.3,0.3]"))
    build_image_transform(pretrained(cfg_factory, directory))
    build_image_transform(pretrained(cfg_factory, directory, "model.vision.mean=[0.1,0.2,0.3]"))


def test_a_pretrained_preprocess_cfg_torchvision_cannot_apply_names_the_file(cfg_factory, tmp_path, open_clip_dir):  # noqa: F811
    """A 2-value mean crashed in torchvision's Normalize while the feature cache was built."""
    directory = with_preprocess(open_clip_dir[0], tmp_path / "bad", {"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]})
    with pytest.raises(ConfigError) as refused:
        build_image_transform(pretrained(cfg_factory, directory))
    assert str(refused.value) == (
        f"model.vision.name_or_path=local-dir:{directory}: its open_clip_config.json's preprocess_cfg.mean must "
        "be 3 values (one per RGB channel), got [0.5, 0.5]"
    )
    # a scalar (was a TypeError traceback) and a NaN (accepted) alike
    for n, bad in enumerate(({"mean": 0.5}, {"std": [0.2, float("nan"), 0.2]})):
        directory = with_preprocess(open_clip_dir[0], tmp_path / f"bad{n}", bad)
        with pytest.raises(ConfigError, match=f"preprocess_cfg.{next(iter(bad))} must be 3"):
            build_image_transform(pretrained(cfg_factory, directory))


def test_an_image_size_the_patches_do_not_tile_is_refused_at_build(cfg_factory):
    """timm's AssertionError came late, while the feature cache was built."""
    with pytest.raises(ConfigError) as refused:
        build_vision_encoder(cfg_factory("model.vision.image_size=70").model.vision)
    assert str(refused.value) == (
        "model.vision.image_size=70 is not a multiple of the ViT's patch size (16): use 64 or 80"
    )
    encoder = build_vision_encoder(cfg_factory("model.vision.image_size=80").model.vision)
    assert encoder(torch.zeros(1, 3, 80, 80)).shape[1] == 1 + 25  # the class token and 5 x 5 patches


def test_an_image_size_error_is_one_line(tmp_path):
    result = run_cli(
        "debug=fast", "modality=vision", "stage=stage1", "model.vision.image_size=70", f"paths.root={tmp_path}",
        *SMALL_DATA,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "mdfnet_hydra.train: error: model.vision.image_size=70 is not a multiple of the ViT's patch size (16): "
        "use 64 or 80"
    )
    assert not list(tmp_path.glob("runs/*/*/stage1/checkpoints")), "nothing trained"


def test_pretrained_weights_at_another_image_size_say_so(cfg_factory, open_clip_dir, caplog):  # noqa: F811
    """timm resamples the 64-px weights' position embeddings: it works, but not as trained."""
    directory, _ = open_clip_dir
    with caplog.at_level(logging.WARNING, logger="mdfnet_hydra.models.vision"):
        build_vision_encoder(pretrained(cfg_factory, directory, "model.vision.image_size=96"))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"model.vision.image_size=96 but local-dir:{directory} was trained at 64 px")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mdfnet_hydra.models.vision"):
        build_vision_encoder(pretrained(cfg_factory, directory))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_flex_attention_on_the_cpu_is_refused_at_start(cfg_factory):
    """inductor's CPU flex-attention kernel failed ('index out of bounds ... cur_qSplitSize') after
    about 30 s, while the feature cache was built."""
    message = "model.text.attention=flex_attention runs on CUDA only, and this job computes on the CPU"
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg_factory("modality=all", "model.text.attention=flex_attention", "trainer.device=cpu"))
    if not torch.cuda.is_available():  # auto: this machine's CPU
        with pytest.raises(ConfigError, match=message):
            validate_config(cfg_factory("modality=text", "model.text.attention=flex_attention"))
    validate_config(cfg_factory("modality=vision", "model.text.attention=flex_attention", "trainer.device=cpu"))
    # a sweep's own process (a login node without a GPU) leaves the machine's checks to its trials' jobs
    validate_config(
        cfg_factory("modality=text", "model.text.attention=flex_attention", "trainer.device=cpu"), host=False
    )


def test_a_pooling_typo_is_refused_by_the_schema(cfg_factory):
    """`max` trained with CLS pooling, silently."""
    with pytest.raises(ConfigCompositionException) as refused:
        cfg_factory("model.text.output=pooled", "model.text.pooling=max")
    assert "model.text.pooling" in str(refused.value.__cause__) and "cls, mean" in str(refused.value.__cause__)
    # mean pooling still averages the real tokens only, padding left out
    tokenizer = train_wordpiece(TEXTS, 300)
    encoder = build_text_encoder(
        cfg_factory("model.text.output=pooled", "model.text.pooling=mean").model.text, tokenizer
    ).eval()
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        pooled, _ = encoder(ids, mask)
        hidden = encoder.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(pooled[0, 0], hidden[0, :4].mean(0))
