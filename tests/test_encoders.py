"""Pretrained-encoder loading through the real code path, on tiny models saved here in the real
on-disk layouts (open_clip's `local-dir:` files; a transformers model + tokenizer directory)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mdfnet_hydra.checkpoint import load_checkpoint
from mdfnet_hydra.config import ConfigError
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


def save_hf_encoder(directory, family: str, **config) -> dict[str, torch.Tensor]:
    """A tiny `family` model (bert, roberta, modernbert; gpt2 for a decoder) and its tokenizer;
    `config`: config.json values to set (max_position_embeddings, vocab_size)."""
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
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            **special,
            **config,
        },
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
    with pytest.raises(ConfigError, match="open_clip_config.json"):
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


def text_cfg(cfg_factory, *overrides: str):
    """model.text of a composed config (source=pretrained unless overridden)."""
    return cfg_factory("model/text=clinical_modernbert", *overrides).model.text


def load_text(cfg_factory, directory, *overrides: str):
    """The tokenizer and encoder of `directory`, through the loading every entry point runs."""
    from mdfnet_hydra.models.text import build_text_encoder, build_tokenizer

    cfg = text_cfg(cfg_factory, f"model.text.name_or_path={directory}", "model.text.max_length=64", *overrides)
    tokenizer = build_tokenizer(cfg, [])
    return tokenizer, build_text_encoder(cfg, tokenizer)


def refused(call, *parts: str) -> str:
    """`call()` ends in a ConfigError of one line holding each of `parts`."""
    with pytest.raises(ConfigError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


def test_a_text_directory_without_its_tokenizer_files_is_refused(cfg_factory, tmp_path):
    """transformers builds a tokenizer of the 5 special tokens alone: every report would be [UNK]."""
    directory = tmp_path / "bert"
    save_hf_encoder(directory, "bert")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()
    refused(lambda: load_text(cfg_factory, directory), str(directory), "tokenizer.json", "0 beyond the special")


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(cfg_factory, tmp_path):
    directory = tmp_path / "bert"
    save_hf_encoder(directory, "bert", vocab_size=40)
    tokens = len(train_wordpiece(TEXTS, 300))
    refused(lambda: load_text(cfg_factory, directory), str(directory), f"{tokens} tokens", "vocab_size is 40")


def test_a_tokenizer_without_a_pad_token_is_refused(cfg_factory, tmp_path):
    directory = tmp_path / "bert"
    save_hf_encoder(directory, "bert")
    for name, key in (("tokenizer_config.json", "pad_token"), ("tokenizer.json", "padding")):
        saved = json.loads((directory / name).read_text())
        saved.pop(key, None)
        (directory / name).write_text(json.dumps(saved))
    refused(lambda: load_text(cfg_factory, directory), str(directory), "no pad token")


def test_a_decoder_only_text_model_is_refused(cfg_factory, tmp_path):
    """GPT-2's first token sees no later token: pooled (cls) features would be one for all reports."""
    from mdfnet_hydra.models.text import build_text_encoder

    directory = tmp_path / "gpt2"
    save_hf_encoder(directory, "gpt2")
    refused(lambda: load_text(cfg_factory, directory, "model.text.output=pooled"), str(directory), "causal")
    cfg = cfg_factory("model/text=tiny_modernbert")
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}
    OmegaConf.update(cfg, "model.text.model_config", gpt2, merge=False)
    refused(lambda: build_text_encoder(cfg.model.text, train_wordpiece(TEXTS, 300)), "model_config", "causal")
    # a BERT configured as a decoder is causal too; a layer-norm epsilon that flattens every state is not
    directory = tmp_path / "bert_decoder"
    save_hf_encoder(directory, "bert", is_decoder=True)
    refused(lambda: load_text(cfg_factory, directory), str(directory), "causal")
    directory = tmp_path / "bert_flat"
    save_hf_encoder(directory, "bert", layer_norm_eps=10.0)
    load_text(cfg_factory, directory)


@pytest.mark.parametrize(
    "override, parts",
    [
        ("+model.text.model_config.hiden_size=128", ["model_config.hiden_size", "did you mean hidden_size"]),
        ("+model.text.model_config.vocab_size=50", ["model_config.vocab_size", "set from the tokenizer"]),
        ("+model.text.model_config.pad_token_id=1", ["model_config.pad_token_id", "set from the tokenizer"]),
        ("~model.text.model_config.model_type", ["has no model_type"]),
        ("model.text.model_config.model_type=modernbertt", ["model_type=modernbertt", "did you mean modernbert"]),
        ("model.text.model_config.num_attention_heads=5", ["model.text.model_config", "attention heads (5)"]),
        # names ModernBERT's config code uses that are not its settings: kept and never read
        ("+model.text.model_config.rope_theta=1234.0", ["model_config.rope_theta", "would ignore it"]),
        ("+model.text.model_config.mean=1", ["model_config.mean", "would ignore it"]),
        ("+model.text.model_config.reference_compile=true", ["model_config.reference_compile", "would ignore it"]),
    ],
)
def test_text_model_config_mistakes_are_refused(cfg_factory, override, parts):
    """A key the config class does not take would be ignored (a misspelt hidden_size trains at the
    default size); the others ended in tracebacks."""
    from mdfnet_hydra.models.text import build_text_encoder

    cfg = cfg_factory("model/text=tiny_modernbert", override).model.text
    refused(lambda: build_text_encoder(cfg, train_wordpiece(TEXTS, 300)), *parts)


@pytest.mark.parametrize(
    "setting",
    ["global_attn_every_n_layers=1", "global_rope_theta=10000.0", "local_attention=16", "sliding_window=16"],
)
def test_modernbert_settings_its_config_takes_are_accepted(cfg_factory, setting):
    """Older names ModernBERT's config reads from its keyword arguments, and a settable property."""
    from mdfnet_hydra.models.text import build_text_encoder

    cfg = cfg_factory("model/text=tiny_modernbert", f"++model.text.model_config.{setting}").model.text
    build_text_encoder(cfg, train_wordpiece(TEXTS, 300))


@pytest.mark.parametrize("family, positions, limit", [("bert", 16, 16), ("roberta", 18, 17)])
def test_max_length_beyond_the_models_positions_is_refused(cfg_factory, tmp_path, family, positions, limit):
    """RoBERTa numbers positions from padding_idx + 1 (0 here): it takes one token fewer than its
    max_position_embeddings - padding_idx; at the limit itself a report of max_length tokens runs."""
    directory = tmp_path / family
    save_hf_encoder(directory, family, max_position_embeddings=positions)
    refused(
        lambda: load_text(cfg_factory, directory, f"model.text.max_length={limit + 1}"),
        f"model.text.max_length={limit + 1}",
        f"model.text.max_length={limit} or less",
    )
    tokenizer, encoder = load_text(cfg_factory, directory, f"model.text.max_length={limit}")
    ids = tokenizer([TEXTS[0] * 3], truncation=True, max_length=limit, return_tensors="pt")
    assert ids["input_ids"].shape[1] == limit
    tokens, _ = encoder.eval()(ids["input_ids"], ids["attention_mask"])
    assert tokens.shape[1] == limit


@pytest.mark.parametrize("kind, message", [("missing", "no such directory"), ("file", "is a file")])
def test_a_text_path_that_is_not_a_directory_says_so(cfg_factory, tmp_path, kind, message):
    """Not the hub cache's 'download <path>' advice."""
    from mdfnet_hydra.models.text import build_tokenizer

    path = tmp_path / "model"
    if kind == "file":
        path.write_text("{}")
    cfg = text_cfg(cfg_factory, f"model.text.name_or_path={path}")
    assert "cache" not in refused(lambda: build_tokenizer(cfg, []), str(path), message)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-64])


@pytest.mark.parametrize(
    "damage, parts",
    [
        (lambda d: _truncate(d / "model.safetensors"), ["SafetensorError", "incomplete metadata"]),
        (lambda d: (d / "model.safetensors").unlink(), ["no file named model.safetensors"]),
        (lambda d: (d / "config.json").unlink(), ["has no config.json"]),
    ],
    ids=["truncated", "no-weights", "no-config"],
)
def test_a_damaged_text_directory_is_refused_in_one_line(cfg_factory, tmp_path, damage, parts):
    directory = tmp_path / "bert"
    save_hf_encoder(directory, "bert")
    damage(directory)
    refused(lambda: load_text(cfg_factory, directory), f"model.text.name_or_path={directory}", *parts)


def test_a_pickle_with_code_is_refused_in_one_line(cfg_factory, tmp_path, open_clip_dir):
    """torch.load(weights_only=True) still refuses it; the refusal is one line, not a traceback."""
    import os

    from mdfnet_hydra.models.vision import build_vision_encoder

    class Code:
        def __reduce__(self):
            return (os.getcwd, ())

    directory = tmp_path / "vision"
    shutil.copytree(open_clip_dir[0], directory)
    (directory / "open_clip_model.safetensors").unlink()
    torch.save({"visual.x": Code()}, directory / "open_clip_pytorch_model.bin")
    cfg = cfg_factory("model/vision=biomedclip", f"model.vision.name_or_path=local-dir:{directory}").model.vision
    refused(lambda: build_vision_encoder(cfg), "open_clip_pytorch_model.bin is refused")


def _rewrite_config(directory, change):
    path = directory / "open_clip_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _other_architecture(directory):
    from open_clip.model import _build_vision_tower

    visual = _build_vision_tower(64, dict(VISION_CFG, timm_model_name="vit_tiny_patch16_224", image_size=64))
    save_file({f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()}, str(directory / WEIGHTS))


WEIGHTS = "open_clip_model.safetensors"


@pytest.mark.parametrize(
    "damage, parts",
    [
        (lambda d: shutil.rmtree(d), ["no such directory"]),
        (lambda d: (d / "open_clip_config.json").unlink(), ["no open_clip_config.json"]),
        (lambda d: (d / WEIGHTS).unlink(), ["no weights"]),
        (lambda d: _truncate(d / WEIGHTS), ["SafetensorError", "truncated"]),
        (_other_architecture, ["do not fit", "trunk.", "more)"]),
        (lambda d: (d / "open_clip_config.json").write_text("{model_cfg"), ["not valid JSON"]),
        (lambda d: _rewrite_config(d, lambda c: c.pop("model_cfg")), ["has no model_cfg"]),
        (
            lambda d: _rewrite_config(d, lambda c: c["model_cfg"]["vision_cfg"].update(timm_drop_pat=0.1)),
            ["timm_drop_pat"],
        ),
        (
            lambda d: _rewrite_config(d, lambda c: c["model_cfg"]["vision_cfg"].update(timm_model_name="vit_tinyy")),
            ["Unknown model (vit_tinyy)"],
        ),
    ],
    ids=["missing", "no-config", "no-weights", "truncated", "other-arch", "bad-json", "no-model-cfg", "typo", "timm"],
)
def test_a_damaged_open_clip_directory_is_refused_in_one_line(cfg_factory, tmp_path, open_clip_dir, damage, parts):
    from mdfnet_hydra.models.vision import build_vision_encoder

    directory = tmp_path / "vision"
    shutil.copytree(open_clip_dir[0], directory)
    damage(directory)
    cfg = cfg_factory("model/vision=biomedclip", f"model.vision.name_or_path=local-dir:{directory}").model.vision
    refused(lambda: build_vision_encoder(cfg), f"model.vision.name_or_path=local-dir:{directory}", *parts)


@pytest.mark.parametrize(
    "overrides, parts",
    [
        (["model.vision.name_or_path=null"], ["model.vision.name_or_path is not set"]),
        (["model.vision.name_or_path=/tmp"], ["has no prefix", "local-dir:/tmp"]),
        (["model.vision.source=config", "model.vision.open_clip_config=null"], ["open_clip_config is empty"]),
    ],
)
def test_vision_options_that_name_no_model_are_refused(cfg_factory, overrides, parts):
    from mdfnet_hydra.models.vision import build_vision_encoder

    cfg = cfg_factory("model/vision=biomedclip", *overrides).model.vision
    refused(lambda: build_vision_encoder(cfg), *parts)
