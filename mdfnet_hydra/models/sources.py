"""What a pretrained encoder directory held when a stage was trained from it.

A run directory's identity is its config (identity.py), and `model.<m>.name_or_path` names a
directory, not its contents: a directory whose weights, architecture config or tokenizer were
replaced in place would let a rerun take the old encoder's results as complete, or resume a stage
whose checkpoint holds the old encoder. Each pretrained encoder of a job therefore gets a content
digest when it is loaded (its architecture config, its tokenizer for text, and its weights as
loaded), recorded with every checkpoint and result of a stage (`encoder_sha256`) and compared when a
later job resumes the stage or finds it complete. Encoders built from a config (the synthetic
default) have none and cost nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import torch

from mdfnet_hydra.config import ConfigError
from mdfnet_hydra.data.feature_cache import encoder_architecture, weights_digest

DIGEST_KEY = "encoder_sha256"  # in checkpoints and a stage's metrics.json: {modality: sha256}
PRETRAINED = "pretrained"


def pretrained_modalities(cfg_model: Any, modalities: list[str]) -> list[str]:
    """The job's modalities whose encoder is loaded from a pretrained directory or hub id."""
    return [
        m
        for m in ("vision", "text")
        if m in modalities and str(getattr(cfg_model[m].source, "value", cfg_model[m].source)) == PRETRAINED
    ]


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 over what turns text into ids (data/token_cache.py: the fast tokenizer's pipeline
    without the last call's truncation state) and its special tokens."""
    from mdfnet_hydra.data.token_cache import tokenizer_digest as pipeline_digest

    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((pipeline_digest(tokenizer) + special).encode()).hexdigest()


def encoder_digest(encoder: torch.nn.Module, tokenizer: Any = None) -> str:
    """SHA-256 over an encoder's architecture config, weights as loaded and (text) tokenizer."""
    h = hashlib.sha256()
    h.update(json.dumps(encoder_architecture(encoder), sort_keys=True, default=str).encode())
    h.update(weights_digest(encoder).encode())
    if tokenizer is not None:
        h.update(tokenizer_digest(tokenizer).encode())
    return h.hexdigest()


def encoder_digests(cfg_model: Any, modalities: list[str], tokenizer: Any) -> dict[str, str]:
    """{modality: digest} of the job's pretrained encoders, each loaded once more for it (about the
    time of one load); {} without loading anything when none is pretrained. The random state is
    left as it was, so a job trains as it did before digests existed."""
    from mdfnet_hydra.models.text import build_text_encoder
    from mdfnet_hydra.models.vision import build_vision_encoder

    out: dict[str, str] = {}
    for modality in pretrained_modalities(cfg_model, modalities):
        with torch.random.fork_rng(devices=[]):
            if modality == "vision":
                out[modality] = encoder_digest(build_vision_encoder(cfg_model.vision))
            else:
                out[modality] = encoder_digest(build_text_encoder(cfg_model.text, tokenizer), tokenizer)
    return out


def changed_encoders(recorded: Optional[dict], current: dict[str, str], cfg_model: Any) -> list[str]:
    """`model.<m>.name_or_path=<dir>` for each encoder whose recorded digest differs from now.
    A stage recorded before digests existed (None, or a modality without one) is accepted."""
    return [
        f"model.{m}.name_or_path={cfg_model[m].name_or_path}"
        for m in sorted(current)
        if isinstance(recorded, dict) and recorded.get(m) not in (None, current[m])
    ]


def refuse_changed_encoders(
    where: str, recorded: Optional[dict], current: dict[str, str], cfg_model: Any, fix: str
) -> None:
    """A ConfigError naming the encoder directories whose contents changed since `where` was trained."""
    changed = changed_encoders(recorded, current, cfg_model)
    if changed:
        raise ConfigError(
            f"{where} was trained from other contents of {', '.join(changed)} (its weights, config or "
            f"tokenizer changed since): put the directory back as it was, or {fix}"
        )
