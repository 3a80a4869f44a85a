"""Pretrained-encoder loading through the real code path, on tiny models saved here in the real
on-disk layouts (open_clip's `local-dir:` files; a transformers model + tokenizer directory)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mdfnet_hydra.checkpoint import load_checkpoint
from mdfnet_hydra.models.text import train_wordpiece
from mdfnet_hydra.pipeline import run

VISION_CFG = {
    "timm_model_name": "test_vit",
    "timm_model_pretrained": False,
    "timm_pool": "",
    "timm_proj": "linear",
    "image_size": 64,
}
TEXTS = [
    "INDICATION: ___ year old M with fever and cough. Evaluate for pneumonia.",
    "INDICATION: ___ year old F with fall and rib pain. Evaluate for fracture.",
] * 50


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    """A BiomedCLIP-shaped open_clip checkpoint: config + weights of image tower and (unused) text tower."""
    from open_clip.model import _build_vision_tower

    directory = tmp_path_factory.mktemp("biomedclip_tiny")
    torch.manual_seed(123)
    visual = _build_vision_tower(64, VISION_CFG)
    state = {f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()}
    state["text.proj.weight"] = torch.randn(64, 32)
    state["logit_scale"] = torch.tensor(4.6)
    save_file(state, str(directory / "open_clip_model.safetensors"))
    (directory / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": {
                    "embed_dim": 64,
                    "vision_cfg": VISION_CFG,
                    "text_cfg": {
                        "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                        "context_length": 256,
                    },
                },
                "preprocess_cfg": {
                    "mean": [0.48145466, 0.4578275, 0.40821073],
                    "std": [0.26862954, 0.26130258, 0.27577711],
                },
            }
        )
    )
    return directory, state


def save_hf_encoder(directory, family: str) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModel

    tokenizer = train_wordpiece(TEXTS, 300)
    tokenizer.save_pretrained(directory)
    special = {"pad_token_id": tokenizer.pad_token_id}
    if family == "modernbert":
        special.update(
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        )
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        **special,
    )
    torch.manual_seed(7)
    model = AutoModel.from_config(config)
    model.save_pretrained(directory)
    return AutoModel.from_pretrained(directory).state_dict()


def test_biomedclip_local_dir_loads_the_image_tower(cfg_factory, tmp_path, open_clip_dir):
    directory, state = open_clip_dir
    cfg = cfg_factory(
        "model/vision=biomedclip",
        f"model.vision.name_or_path=local-dir:{directory}",
        "model.vision.image_size=64",
        "modality=vision",
        "stage=stage1",
        "debug=fast",
    )
    run(cfg)
    trained = load_checkpoint(tmp_path / "run" / "stage1" / "checkpoints" / "last.pth")["model"]
    trunk = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    assert trunk
    for key, value in trunk.items():
        assert torch.equal(trained[f"encoders.vision.{key}"], value), key  # loaded, then frozen in stage 1


def test_missing_open_clip_files_give_a_clear_error(cfg_factory, tmp_path):
    cfg = cfg_factory(
        "model/vision=biomedclip", f"model.vision.name_or_path=local-dir:{tmp_path}", "modality=vision", "debug=fast"
    )
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        run(cfg)


@pytest.mark.parametrize("family", ["bert", "roberta", "modernbert"])
def test_any_local_bert_family_text_encoder_trains(cfg_factory, tmp_path, family):
    directory = tmp_path / family
    saved = save_hf_encoder(directory, family)
    cfg = cfg_factory(
        "model/text=clinical_modernbert",
        f"model.text.name_or_path={directory}",
        "model.text.max_length=64",
        "modality=text",
        "stage=stage1",
        "debug=fast",
    )
    run(cfg)
    trained = load_checkpoint(tmp_path / "run" / "stage1" / "checkpoints" / "last.pth")["model"]
    for key, value in saved.items():
        assert torch.equal(trained[f"encoders.text.backbone.{key}"], value), key


@pytest.mark.parametrize(
    "group, repo, option",
    [
        (
            "model/vision=biomedclip",
            "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
            "model.vision.name_or_path=local-dir:",
        ),
        ("model/text=clinical_modernbert", "Simonlee711/Clinical_ModernBERT", "model.text.name_or_path="),
    ],
)
def test_uncached_hub_model_fails_with_what_to_do(cfg_factory, group, repo, option):
    from mdfnet_hydra.models.hub import ModelUnavailableError
    from mdfnet_hydra.models.text import build_tokenizer
    from mdfnet_hydra.models.vision import build_vision_encoder

    cfg = cfg_factory(group)
    with pytest.raises(ModelUnavailableError) as err:
        if group.startswith("model/vision"):
            build_vision_encoder(cfg.model.vision)
        else:
            build_tokenizer(cfg.model.text, [])
    message = str(err.value)
    assert repo in message and option in message and "HF_HUB_OFFLINE is set" in message and "cache (" in message


def test_pretrained_vision_uses_its_own_preprocessing(cfg_factory, tmp_path, open_clip_dir):
    from torchvision.transforms import Normalize

    from mdfnet_hydra.models.vision import build_image_transform

    directory, _ = open_clip_dir
    custom = tmp_path / "custom"
    shutil.copytree(directory, custom)
    config = json.loads((custom / "open_clip_config.json").read_text())
    config["preprocess_cfg"] = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7]}
    (custom / "open_clip_config.json").write_text(json.dumps(config))
    cfg = cfg_factory(
        "model/vision=biomedclip", f"model.vision.name_or_path=local-dir:{custom}", "model.vision.image_size=64"
    )
    (normalize,) = [t for t in build_image_transform(cfg.model.vision).transforms if isinstance(t, Normalize)]
    assert tuple(normalize.mean) == (0.1, 0.2, 0.3) and tuple(normalize.std) == (0.5, 0.6, 0.7)


def test_a_trained_vocabulary_must_hold_the_texts_characters():
    """Below the special tokens and every character (alone and as a ## continuation) the vocabulary
    would be larger than asked, characters only: refused, naming the size it needs."""
    from mdfnet_hydra.config import ConfigError

    characters = set("".join(TEXTS).lower()) - {" "}
    needed = 5 + 2 * len(characters)
    assert len(train_wordpiece(TEXTS, needed)) == needed, "characters only, no word"
    assert len(train_wordpiece(TEXTS, needed + 3)) == needed + 3, "three words more"
    with pytest.raises(ConfigError, match=f"tokenizer_vocab_size={needed - 1} is smaller than the {needed} tokens"):
        train_wordpiece(TEXTS, needed - 1)
