"""What a pretrained encoder directory held when a stage was trained from it.

A run directory's identity is its config (identity.py), and `model.<m>.name_or_path` names a
directory, not its contents: a directory whose weights, architecture config or tokenizer were
replaced in place would let a rerun take the old encoder's results as complete, or resume a stage
whose checkpoint holds the old encoder. Each pretrained encoder of a job therefore gets a digest of
its files, in three parts (its architecture config as parsed, its tokenizer files, its weight
files), recorded with every checkpoint and result of a stage (`encoder_sha256`) and compared when a
later job resumes the stage or finds it complete. A phase that starts from a checkpoint (stage 2,
`stage.init_from`) takes its encoder weights from there, so only config and tokenizer count for it.

The files are read, not the model built: no second load, nothing a library version adds (its
defaults, a randomly initialised missing weight), nothing that can fail on one rank only. A
directory that cannot be read gets no digest: loading it fails later, on every rank, with the
loader's own message. Encoders built from a config (the synthetic default) have none and cost nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from mdfnet_hydra.config import ConfigError

DIGEST_KEY = "encoder_sha256"  # in checkpoints and a stage's metrics.json: {modality: {part: sha256}}
PRETRAINED = "pretrained"
PARTS = ("config", "tokenizer", "weights")
START_PARTS = ("config", "tokenizer")  # what counts for a phase that starts from a checkpoint
# the weight files transformers reads (an optimizer.bin or training_args.bin beside them is not the model)
WEIGHT_PREFIXES = ("model", "pytorch_model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")

# config keys of a transformers backbone that do not change its outputs: where it was loaded from,
# the library version that saved it, the attention kernel (model.text.attention, a runtime key),
# the storage dtype (the weights' own dtype is hashed with them) and the class names
IGNORED_BACKBONE_KEYS = (
    "_name_or_path",
    "_commit_hash",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
)


def pretrained_modalities(cfg_model: Any, modalities: list[str]) -> list[str]:
    """The job's modalities whose encoder is loaded from a pretrained directory or hub id."""
    return [
        m
        for m in ("vision", "text")
        if m in modalities and str(getattr(cfg_model[m].source, "value", cfg_model[m].source)) == PRETRAINED
    ]


def encoder_digests(cfg_model: Any, modalities: list[str]) -> dict[str, dict[str, str]]:
    """{modality: {part: sha256}} of the job's pretrained encoders whose files can be read now."""
    out: dict[str, dict[str, str]] = {}
    for modality in pretrained_modalities(cfg_model, modalities):
        try:
            digest = _vision_digest(cfg_model.vision) if modality == "vision" else _text_digest(cfg_model.text)
        except Exception:  # noqa: BLE001 - unreadable now: the load reports it, on every rank
            digest = None
        if digest:
            out[modality] = digest
    return out


def _text_digest(cfg: Any) -> Optional[dict[str, str]]:
    from mdfnet_hydra.models.text import TOKENIZER_FILES  # (not at start: a job without text never imports it)

    directory = _text_directory(str(cfg.name_or_path))
    if directory is None:
        return None
    config = json.loads((directory / "config.json").read_text())
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return {
        "config": _json_digest({k: v for k, v in config.items() if k not in IGNORED_BACKBONE_KEYS}),
        "tokenizer": _files_digest(p for p in files if p.name in TOKENIZER_FILES),
        "weights": _files_digest(
            p for p in files if p.name.startswith(WEIGHT_PREFIXES) and p.name.endswith(WEIGHT_SUFFIXES)
        ),
    }


def _text_directory(name_or_path: str) -> Optional[Path]:
    """A local directory as the loader finds it (models/text.py); a hub id's snapshot in the local cache."""
    from huggingface_hub import snapshot_download

    from mdfnet_hydra.models.text import local_directory

    path = local_directory(name_or_path)
    if path is not None:
        return path
    return Path(snapshot_download(name_or_path, local_files_only=True))


def _vision_digest(cfg: Any) -> dict[str, str]:
    from mdfnet_hydra.models.vision import OPEN_CLIP_CONFIG, WEIGHT_FILES, _locate

    files = _locate(cfg.name_or_path)
    config = json.loads(files[OPEN_CLIP_CONFIG].read_text())
    weights = next(files[name] for name in WEIGHT_FILES if name in files)  # the file the loader reads
    return {
        "config": _json_digest({k: config.get(k) for k in ("model_cfg", "preprocess_cfg")}),
        "weights": _files_digest([weights]),
    }


def _json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _files_digest(paths: Iterable[Path]) -> str:
    """SHA-256 over each file's name and bytes, in name order."""
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def changed_encoders(
    recorded: Optional[dict], current: dict[str, dict[str, str]], cfg_model: Any, from_checkpoint: bool
) -> list[str]:
    """`model.<m>.name_or_path=<dir> (<parts>)` for each encoder whose recorded digest differs from
    now in a part that counts (weights only where the phase did not start from a checkpoint). A
    stage recorded before digests existed, or a part not recorded, is accepted."""
    parts = START_PARTS if from_checkpoint else PARTS
    out = []
    for modality in sorted(current):
        then = recorded.get(modality) if isinstance(recorded, dict) else None
        if not isinstance(then, dict):
            continue
        differ = [p for p in parts if then.get(p) is not None and then.get(p) != current[modality].get(p)]
        if differ:
            out.append(
                f"model.{modality}.name_or_path={cfg_model[modality].name_or_path} ({', '.join(differ)} changed)"
            )
    return out


def refuse_changed_encoders(
    where: str,
    recorded: Optional[dict],
    current: dict[str, dict[str, str]],
    cfg_model: Any,
    fix: str,
    from_checkpoint: bool = False,
) -> None:
    """A ConfigError naming the encoder directories whose contents changed since `where` was trained."""
    changed = changed_encoders(recorded, current, cfg_model, from_checkpoint)
    if changed:
        raise ConfigError(
            f"{where} was trained from other contents of {', '.join(changed)}: put the directory back as it "
            f"was, or {fix}"
        )
