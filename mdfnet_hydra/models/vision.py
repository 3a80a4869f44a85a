"""Image encoder: an open_clip image tower (timm ViT trunk), built from a config or loaded from
BiomedCLIP's open_clip files. Only the image tower is ever built: the text tower would need a
second hub model we do not use."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mdfnet_hydra.config import ConfigError, TokenOutput, VisionConfig, VisionSource, three_channel_values, to_plain
from mdfnet_hydra.models.hub import first_line

log = logging.getLogger(__name__)

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
    preprocess_cfg = None
    if cfg.source is VisionSource.config:
        if not cfg.open_clip_config:
            raise ConfigError(
                "model.vision.open_clip_config is empty: source=config builds the image tower from it "
                "({embed_dim, vision_cfg}, see conf/model/vision); give it or use source=pretrained"
            )
        model_cfg = to_plain(cfg.open_clip_config)
        visual = _build_visual(model_cfg, "model.vision.open_clip_config")
    else:
        config, state = load_open_clip_files(cfg.name_or_path)
        model_cfg, preprocess_cfg = config["model_cfg"], config.get("preprocess_cfg")
        visual = _build_visual(
            model_cfg, f"model.vision.name_or_path={cfg.name_or_path}: its {OPEN_CLIP_CONFIG} model_cfg"
        )
        _load_tower(visual, state, str(cfg.name_or_path))
        warn_resized_positions(cfg, model_cfg)
    check_patch_size(visual, cfg.image_size)
    _set_input_size(visual, cfg.image_size)
    encoder = VisionEncoder(visual, cfg.output)
    encoder.open_clip_config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    return encoder


def _build_visual(model_cfg: dict[str, Any], where: str) -> nn.Module:
    """open_clip's image tower of `model_cfg`; a config it cannot build (a missing key, a misspelt
    vision_cfg key, an unknown timm model, sizes that do not fit) refused in one line naming `where`."""
    from open_clip.model import _build_vision_tower

    try:
        return _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"])
    except KeyError as err:
        raise ConfigError(f"{where} has no {err}: give embed_dim and vision_cfg") from err
    except (TypeError, RuntimeError, ValueError, AssertionError) as err:
        raise ConfigError(
            f"{where} cannot build the image tower ({first_line(err)}); fix the setting it names"
        ) from err


def _load_tower(visual: nn.Module, state: dict[str, torch.Tensor], name_or_path: str) -> None:
    """Load the `visual.*` weights; weights of another architecture are refused in one line naming
    up to 3 parameters (torch's error lists every one)."""
    from mdfnet_hydra.checkpoint import weight_differences

    tower = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not tower:
        raise ConfigError(
            f"model.vision.name_or_path={name_or_path}: the weights hold no 'visual.*' (image tower) keys; "
            "give an open_clip model's directory"
        )
    differences = weight_differences(visual.state_dict(), tower)
    if differences:
        raise ConfigError(
            f"model.vision.name_or_path={name_or_path}: the weights do not fit the image tower its "
            f"{OPEN_CLIP_CONFIG} describes ({'; '.join(differences)}): give the config saved with these weights"
        )
    visual.load_state_dict(tower, strict=True)


def build_image_transform(cfg: VisionConfig, train: bool = False) -> Callable:
    """open_clip's eval transform (resize, centre crop, RGB, normalise) at the encoder's size, with
    the pretrained model's own preprocess_cfg (mean, std, interpolation, resize mode) when it has one.
    `train`: open_clip's training transform instead (random resized crop, scale 0.9-1.0; no flips,
    which would move the heart to the wrong side)."""
    from open_clip.transform import image_transform

    preprocess: dict[str, Any] = {}
    if cfg.source is VisionSource.pretrained:
        preprocess = dict(load_open_clip_config(cfg.name_or_path).get("preprocess_cfg") or {})
        check_normalisation(cfg, preprocess)
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
    return _read_config(_locate(name_or_path)[OPEN_CLIP_CONFIG], name_or_path)


def load_open_clip_files(name_or_path: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read open_clip_config.json (its model_cfg checked) and the weights from `local-dir:<dir>` or
    `hf-hub:<id>`."""
    files = _locate(name_or_path)
    config = _read_config(files[OPEN_CLIP_CONFIG], name_or_path)
    if not isinstance(config.get("model_cfg"), dict):
        raise ConfigError(
            f"model.vision.name_or_path={name_or_path}: its {OPEN_CLIP_CONFIG} has no model_cfg "
            "({embed_dim, vision_cfg}): give the open_clip_config.json saved with the model"
        )
    weights = next((files[w] for w in WEIGHT_FILES if w in files), None)
    if weights is None:
        raise ConfigError(
            f"model.vision.name_or_path={name_or_path}: no weights (none of {', '.join(WEIGHT_FILES)}); "
            "copy the model's weights file into the directory"
        )
    return config, _read_weights(Path(weights), name_or_path)


def _read_config(path: Path, name_or_path: str | None) -> dict[str, Any]:
    """open_clip_config.json as a dict; a damaged file refused in one line naming it."""
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"model.vision.name_or_path={name_or_path}: {path} is not valid JSON ({err}); copy it again"
        ) from err
    if not isinstance(config, dict):
        raise ConfigError(f"model.vision.name_or_path={name_or_path}: {path} is not a JSON object; copy it again")
    return config


def _read_weights(path: Path, name_or_path: str | None) -> dict[str, torch.Tensor]:
    """The weights file's tensors. A pickle holding more than tensors stays refused (torch.load
    weights_only): in one line, as is a truncated or damaged file."""
    import pickle

    from safetensors import SafetensorError

    where = f"model.vision.name_or_path={name_or_path}: {path.name}"
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{where} is refused: a pickle holding more than tensors (code may run on loading), or not a "
            "torch file; use open_clip_model.safetensors from a source you trust"
        ) from err
    except (SafetensorError, RuntimeError, EOFError, OSError) as err:
        raise ConfigError(
            f"{where} cannot be read ({first_line(err)}); the file is truncated or damaged: copy it again"
        ) from err


def _locate(name_or_path: str | None) -> dict[str, Path]:
    if not name_or_path:
        raise ConfigError(
            "model.vision.name_or_path is not set: source=pretrained needs local-dir:<dir> or hf-hub:<id> "
            "(or use source=config with open_clip_config)"
        )
    if name_or_path.startswith("local-dir:"):
        files = _local_files(Path(name_or_path[len("local-dir:") :]).expanduser(), name_or_path)
    elif name_or_path.startswith("hf-hub:"):
        files = _hub_files(name_or_path[len("hf-hub:") :])
    else:
        hint = f"local-dir:{name_or_path}" if Path(name_or_path).expanduser().is_dir() else "local-dir:<dir>"
        raise ConfigError(
            f"model.vision.name_or_path={name_or_path} has no prefix: give {hint} (an open_clip directory) "
            "or hf-hub:<id>"
        )
    if OPEN_CLIP_CONFIG not in files:
        hint = " (a transformers text model goes in model.text.name_or_path)" if "config.json" in files else ""
        raise ConfigError(
            f"model.vision.name_or_path={name_or_path}: no {OPEN_CLIP_CONFIG}{hint}; give the directory of "
            "an open_clip model (open_clip_config.json + weights)"
        )
    return files


def _local_files(directory: Path, name_or_path: str) -> dict[str, Path]:
    """The files of a `local-dir:` directory; one that is missing or a file refused in one line."""
    if not directory.exists():
        raise ConfigError(f"model.vision.name_or_path={name_or_path}: no such directory")
    if not directory.is_dir():
        raise ConfigError(f"model.vision.name_or_path={name_or_path} is a file: give the model's directory")
    return {p.name: p for p in directory.iterdir()}


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


def check_normalisation(cfg: VisionConfig, preprocess: dict[str, Any]) -> None:
    """A pretrained directory normalises with its own preprocess_cfg (the statistics its weights were
    trained with). An explicit `model.vision.mean` / `std` would be ignored while it still changed the
    run's identity and the feature cache key, so one that differs from the schema's default and from
    the directory's is refused; so is a preprocess_cfg torchvision cannot normalise RGB images with."""
    defaults = VisionConfig(name="default")
    for key in ("mean", "std"):
        own = preprocess.get(key)
        if own is None:
            continue
        if not three_channel_values(own, positive=key == "std"):
            raise ConfigError(
                f"model.vision.name_or_path={cfg.name_or_path}: its {OPEN_CLIP_CONFIG}'s preprocess_cfg.{key} must be 3 "
                f"{'positive ' if key == 'std' else ''}values (one per RGB channel), got {own!r}"
            )
        given = [float(v) for v in getattr(cfg, key)]
        if given != [float(v) for v in getattr(defaults, key)] and given != [float(v) for v in own]:
            raise ConfigError(
                f"model.vision.{key}={given} is not used: the pretrained {cfg.name_or_path} normalises with its "
                f"{OPEN_CLIP_CONFIG}'s preprocess_cfg.{key} {list(own)}; leave model.vision.{key} unset"
            )


def check_patch_size(visual: nn.Module, image_size: int) -> None:
    """An image side the ViT's patches do not tile: timm would fail at the first forward pass (an
    AssertionError, while the feature cache is built); refused at build with the sizes that work."""
    patch_embed = getattr(getattr(visual, "trunk", None), "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None:
        return
    side = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    if side < 1 or image_size % side == 0:
        return
    below = image_size // side * side
    nearest = " or ".join(str(n) for n in (below, below + side) if n >= side)
    raise ConfigError(
        f"model.vision.image_size={image_size} is not a multiple of the ViT's patch size ({side}): use {nearest}"
    )


def warn_resized_positions(cfg: VisionConfig, model_cfg: dict[str, Any]) -> None:
    """Pretrained weights at another image size than theirs: timm resamples the position embeddings,
    which works but is not the model as trained, so the log says so once."""
    trained = model_cfg.get("vision_cfg", {}).get("image_size")
    if isinstance(trained, (list, tuple)):  # (height, width): this project's images are square
        trained = trained[0] if len(set(trained)) == 1 else trained
    if trained is not None and trained != int(cfg.image_size):
        log.warning(
            "model.vision.image_size=%d but %s was trained at %s px: its position embeddings are resampled "
            "to the new size (model.vision.image_size=%s uses them as trained)",
            cfg.image_size,
            cfg.name_or_path,
            trained,
            trained,
        )
