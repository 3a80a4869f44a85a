"""Image encoder: an open_clip image tower (timm ViT trunk), built from a config or loaded from
BiomedCLIP's open_clip files. Only the image tower is ever built: the text tower would need a
second hub model we do not use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mdfnet_hydra.config import TokenOutput, VisionConfig, VisionSource, to_plain

OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class VisionEncoder(nn.Module):
    """images (B, 3, H, W) -> tokens (B, N, width); N = 1 for the pooled embedding."""

    def __init__(self, visual: nn.Module, output: TokenOutput) -> None:
        super().__init__()
        self.output = TokenOutput(output)
        # the open_clip config ({model_cfg, preprocess_cfg}) the tower was built from (feature_cache.encoder_architecture)
        self.open_clip_config: dict[str, Any] = {}
        if self.output is TokenOutput.tokens:
            # The CLS + patch tokens of the trunk; the open_clip projection head is not used.
            self.trunk = visual.trunk
            self.out_dim = visual.trunk.num_features
        else:
            self.visual = visual
            self.out_dim = visual.head.proj.out_features if hasattr(visual.head, "proj") else visual.trunk.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.output is TokenOutput.tokens:
            return self.trunk.forward_features(images)
        return self.visual(images).unsqueeze(1)

    @property
    def token_layer(self) -> nn.Module:
        """The layer whose output is the final token states (prefix tokens, then one per patch, in
        row-major order), whichever output the fusion takes: what Grad-CAM hooks."""
        trunk = self.trunk if self.output is TokenOutput.tokens else self.visual.trunk
        return trunk.norm

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in `token_layer`'s output (the class token)."""
        trunk = self.trunk if self.output is TokenOutput.tokens else self.visual.trunk
        return int(getattr(trunk, "num_prefix_tokens", 1))


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    from open_clip.model import _build_vision_tower

    preprocess_cfg = None
    if cfg.source is VisionSource.config:
        if not cfg.open_clip_config:
            raise ValueError(f"model.vision '{cfg.name}': source=config needs open_clip_config")
        model_cfg = to_plain(cfg.open_clip_config)
        visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"])
    else:
        model_cfg, state = load_open_clip_files(cfg.name_or_path)
        preprocess_cfg = load_open_clip_config(cfg.name_or_path).get("preprocess_cfg")
        visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"])
        tower = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        if not tower:
            raise ValueError(f"{cfg.name_or_path}: the weights hold no 'visual.*' (image tower) keys")
        visual.load_state_dict(tower, strict=True)
    _set_input_size(visual, cfg.image_size)
    encoder = VisionEncoder(visual, cfg.output)
    encoder.open_clip_config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    return encoder


def build_image_transform(cfg: VisionConfig, train: bool = False) -> Callable:
    """open_clip's eval transform (resize, centre crop, RGB, normalise) at the encoder's size, with
    the pretrained model's own preprocess_cfg (mean, std, interpolation, resize mode) when it has one.
    `train`: open_clip's training transform instead (random resized crop, scale 0.9-1.0; no flips,
    which would move the heart to the wrong side)."""
    from open_clip.transform import image_transform

    preprocess: dict[str, Any] = {}
    if cfg.source is VisionSource.pretrained:
        preprocess = dict(load_open_clip_config(cfg.name_or_path).get("preprocess_cfg") or {})
    return image_transform(
        cfg.image_size,
        is_train=train,
        mean=tuple(preprocess.get("mean") or cfg.mean),
        std=tuple(preprocess.get("std") or cfg.std),
        resize_mode=preprocess.get("resize_mode"),
        interpolation=preprocess.get("interpolation"),
    )


def load_open_clip_config(name_or_path: str | None) -> dict[str, Any]:
    """The whole open_clip_config.json ({model_cfg, preprocess_cfg}) of `local-dir:` / `hf-hub:`."""
    files = _locate(name_or_path)
    return json.loads(Path(files[OPEN_CLIP_CONFIG]).read_text())


def load_open_clip_files(name_or_path: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read open_clip_config.json's model_cfg and the weights from `local-dir:<dir>` or `hf-hub:<id>`."""
    files = _locate(name_or_path)
    model_cfg = json.loads(Path(files[OPEN_CLIP_CONFIG]).read_text())["model_cfg"]
    weights = next((files[w] for w in WEIGHT_FILES if w in files), None)
    if weights is None:
        raise FileNotFoundError(f"{name_or_path}: none of {WEIGHT_FILES} found")
    if str(weights).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    return model_cfg, state


def _locate(name_or_path: str | None) -> dict[str, Path]:
    if not name_or_path:
        raise ValueError("model.vision.name_or_path is required for source=pretrained")
    if name_or_path.startswith("local-dir:"):
        directory = Path(name_or_path[len("local-dir:") :]).expanduser()
        files = {p.name: p for p in directory.iterdir()} if directory.is_dir() else {}
    elif name_or_path.startswith("hf-hub:"):
        files = _hub_files(name_or_path[len("hf-hub:") :])
    else:
        raise ValueError(f"model.vision.name_or_path must start with 'hf-hub:' or 'local-dir:', got {name_or_path!r}")
    if OPEN_CLIP_CONFIG not in files:
        raise FileNotFoundError(f"{name_or_path}: no {OPEN_CLIP_CONFIG} found")
    return files


def _hub_files(repo_id: str) -> dict[str, Path]:
    """open_clip_config.json and the first weight file the repo (or, offline, the cache) has."""
    from huggingface_hub import hf_hub_download

    from mdfnet_hydra.models.hub import hub_reachable, unavailable

    local_only = not hub_reachable()
    option = "model.vision.name_or_path=local-dir:<dir> (open_clip_config.json + weights)"
    try:
        files = {OPEN_CLIP_CONFIG: Path(hf_hub_download(repo_id, OPEN_CLIP_CONFIG, local_files_only=local_only))}
    except (OSError, ValueError) as err:  # not cached / not downloadable
        raise unavailable("BiomedCLIP image tower", repo_id, option, err) from err
    last: Exception | None = None
    for name in WEIGHT_FILES:
        try:
            files[name] = Path(hf_hub_download(repo_id, name, local_files_only=local_only))
            return files
        except (OSError, ValueError) as err:
            last = err
    raise unavailable("BiomedCLIP image tower", repo_id, option, last or FileNotFoundError(repo_id))


def _set_input_size(visual: nn.Module, image_size: int) -> None:
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and getattr(trunk, "dynamic_img_size", False):
        return
    if trunk is not None and hasattr(trunk, "set_input_size"):
        patch_embed = getattr(trunk, "patch_embed", None)
        current = getattr(patch_embed, "img_size", None)
        if current is not None and tuple(current) != (image_size, image_size):
            trunk.set_input_size(img_size=image_size)
