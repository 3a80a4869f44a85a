"""Frozen-encoder outputs, computed once per split and read back memory-mapped.

While the pre-trained encoders are frozen and their inputs deterministic (stage 1 without
augmentation), every epoch would recompute exactly the same image and text features. They are
computed once instead, stored in half precision under `paths.cache_dir/<modality>/<key>/`, and the
fusion layer and head train from them.

The key is a digest of everything that determines the outputs: the encoder's config, its own
architecture config (a transformers config.json, an open_clip model_cfg) and weights,
the preprocessing (the image transform, the token ids themselves, which cover tokenizer, max length
and text), the split's rows (sample ids, image paths, and each image file's size and modification
time), the compute precision and the storage dtype. A changed input gives another key, never a
stale cache. One cache per (encoder, split) is shared by every job that needs it: sweep trials
and other modality combinations with the same encoder.

Concurrent jobs are safe: one builds under a lock, into a temporary directory renamed into place
(data/cache_store.py); the others wait and read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from mdfnet_hydra.config import TEXT_RUNTIME_KEYS
from mdfnet_hydra.data import cache_store
from mdfnet_hydra.data.dataset import Collator, MultimodalDataset, padded_length, unreadable_image
from mdfnet_hydra.data.loading import loader_settings
from mdfnet_hydra.models.sources import IGNORED_BACKBONE_KEYS

log = logging.getLogger(__name__)

FORMAT = 1
CACHED_MODALITIES = ("vision", "text")  # the pre-trained encoders; the clinical encoder always trains
DTYPES = {"float16": np.float16, "float32": np.float32}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
DEVICE_SHARE = 0.25  # auto: cached splits held on a CUDA device while they fit in this share of its memory
# what to do when ranks on other nodes do not see the cache rank 0 built
SHARED_CACHE = "paths.cache_dir must be on a file system every node shares, or data.feature_cache=false"
HOLD_CHUNK_BYTES = 64 * 2**20  # per host-to-device copy when a cache is moved onto the device


# ---------------------------------------------------------------- keys
def _update_with_tensor(h: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        _update_with_tensor(h, name, tensor)
    return h.hexdigest()


def encoder_architecture(encoder: torch.nn.Module) -> dict[str, Any]:
    """The encoder's own architecture config, which changes its outputs without changing its weights
    (a config.json's `hidden_act` or `layer_norm_eps`, an open_clip_config.json's `timm_pool`): a
    transformers backbone's `config.to_dict()` without IGNORED_BACKBONE_KEYS, or the open_clip
    model_cfg and preprocess_cfg the image tower was built from."""
    backbone_config = getattr(getattr(encoder, "backbone", None), "config", None)
    if backbone_config is not None:
        return {
            k: v
            for k, v in backbone_config.to_dict().items()
            if k not in IGNORED_BACKBONE_KEYS and not k.startswith("_attn_implementation")
        }
    return dict(getattr(encoder, "open_clip_config", None) or {})


def _image_stat(dataset: MultimodalDataset, index: int, path: Path) -> os.stat_result:
    """The image's size and time for the key; a missing image (deleted after `prepare`, with
    data.verify_images off) fails naming itself privately, as reading it would."""
    try:
        return os.stat(path)
    except OSError as err:
        raise unreadable_image(dataset.split, index, path, err) from err


def _rows_digest(dataset: MultimodalDataset, modality: str) -> str:
    """The split's inputs for one encoder: rows and image files, or the token ids."""
    h = hashlib.sha256()
    frame = dataset.split.frame
    h.update(pd.util.hash_pandas_object(frame["sample_id"].astype(str), index=False).values.tobytes())
    if modality == "vision":
        # the transform's repr names every step and parameter (addresses of plain functions removed)
        h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(dataset.image_transform)).encode())
        for index, path in enumerate(dataset.image_paths):
            stat = _image_stat(dataset, index, path)
            h.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    else:
        h.update(dataset.token_ids.digest().encode())
    return h.hexdigest()


def cache_key(
    encoder: torch.nn.Module, encoder_config: Any, dataset: MultimodalDataset, modality: str, compute: str, dtype: str
) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": FORMAT,
                "modality": modality,
                "encoder": {
                    k: v for k, v in encoder_config.items() if modality != "text" or k not in TEXT_RUNTIME_KEYS
                },
                "compute": compute,
                "dtype": dtype,
                "output": str(getattr(encoder, "output", "")),
                "architecture": encoder_architecture(encoder),
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    h.update(weights_digest(encoder).encode())
    h.update(_rows_digest(dataset, modality).encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- storage
class FeatureArrays:
    """One (encoder, split) cache, opened memory-mapped on first use in each process (DataLoader
    workers open their own maps instead of receiving copies of the data)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        self._features: Optional[np.ndarray] = None
        self._padding: Optional[np.ndarray] = None

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "meta": self.meta, "_features": None, "_padding": None}

    @property
    def features(self) -> np.ndarray:
        if self._features is None:
            self._features = np.load(self.directory / "features.npy", mmap_mode="r")
        return self._features

    @property
    def padding(self) -> Optional[np.ndarray]:
        if self._padding is None and (self.directory / "padding.npy").is_file():
            self._padding = np.load(self.directory / "padding.npy", mmap_mode="r")
        return self._padding

    def __len__(self) -> int:
        return int(self.meta["rows"])


def open_or_build(root: Path, modality: str, key: str, build) -> tuple[FeatureArrays, bool]:
    """The cache `root/modality/key`, and whether this call built it (with `build(tmp_dir)`)."""
    directory, built = cache_store.open_or_build(root, modality, key, build)
    return FeatureArrays(directory), built


# ---------------------------------------------------------------- building
@torch.no_grad()
def compute_features(
    encoder: torch.nn.Module,
    dataset: MultimodalDataset,
    modality: str,
    out: Path,
    *,
    runtime,
    data,
    dtype: str,
    batch_size: int,
    pad_id: int,
) -> None:
    """Run the frozen encoder over the split in order and write features.npy (N, T, D) [and
    padding.npy (N, T), text only, padded to the split's longest sequence] and meta.json."""
    encoder.eval()
    device, n = runtime.device, len(dataset)
    inputs = dataset.restricted_to(modality)
    loader = DataLoader(
        inputs,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=Collator(pad_id),
        **loader_settings(data, runtime, inputs, persistent=False),
    )
    width = int(dataset.token_ids.lengths.max()) if modality == "text" else None
    features = padding = None
    started = time.perf_counter()
    for batch in loader:
        idx = batch["index"].numpy()
        with runtime.autocast():
            if modality == "vision":
                tokens, pad = encoder(batch["image"].to(device, non_blocking=True)), None
            else:
                tokens, pad = encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        # converted to the storage dtype on the device: half the bytes to copy back, no CPU conversion
        tokens = tokens.to(TORCH_DTYPES[dtype]).cpu().numpy()
        if features is None:
            length = tokens.shape[1] if pad is None else width
            features = np.lib.format.open_memmap(
                out / "features.npy", mode="w+", dtype=DTYPES[dtype], shape=(n, length, tokens.shape[2])
            )
            if pad is not None:
                padding = np.lib.format.open_memmap(out / "padding.npy", mode="w+", dtype=np.bool_, shape=(n, length))
                padding[:] = True
        if pad is None:
            features[idx] = tokens
        else:
            span = tokens.shape[1]
            features[idx, :span] = tokens
            features[idx, span:] = 0
            padding[idx, :span] = pad.cpu().numpy()
    for array in (features, padding):
        if array is not None:
            array.flush()
    meta = {
        "format": FORMAT,
        "modality": modality,
        "rows": n,
        "shape": list(features.shape),
        "dtype": dtype,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


# ---------------------------------------------------------------- training from the cache
class CachedFeatureDataset(Dataset):
    """A split served from cached encoder outputs: `<modality>_features` (and `text_padding`)
    instead of images and token ids, plus targets, mask and the clinical features. Batches are
    read with one memory-mapped fancy index (`__getitems__`), not item by item. Text is trimmed to
    the batch's longest report, or padded up to its length bucket (`model.text.length_buckets`).

    `hold_on(device)` copies the split's arrays into a device's memory once; batches are then
    gathered there by one index, already on the device: no loader work, no host-to-device copy,
    and no host synchronisation (the trimmed width comes from lengths kept on the host)."""

    def __init__(self, base: MultimodalDataset, caches: dict[str, FeatureArrays], buckets: Sequence[int] = ()) -> None:
        self.split = base.split
        self.base = base
        self.caches = caches
        self.buckets = tuple(int(b) for b in buckets)
        self.resident_device: Optional[torch.device] = None  # set by hold_on
        self._held: dict[str, torch.Tensor] = {}
        self._lengths: dict[str, np.ndarray] = {}  # real tokens per row, of each cache with padding

    @property
    def nbytes(self) -> int:
        """The bytes `hold_on` puts on the device: every cached array, targets, mask and clinical features."""
        arrays = [c.features for c in self.caches.values()] + [c.padding for c in self.caches.values()]
        small = [self.base.targets, self.base.mask, self.base.clinical]
        return sum(int(a.nbytes) for a in arrays if a is not None) + sum(
            t.numel() * t.element_size() for t in small if t is not None
        )

    def hold_on(self, device: torch.device) -> None:
        """Copy this split's arrays into `device`'s memory (RAM for the CPU), in chunks of rows so a
        large cache never needs a second full copy in host memory."""
        held: dict[str, torch.Tensor] = {}
        for modality, cache in self.caches.items():
            held[f"{modality}_features"] = _copy_rows(cache.features, device)
            if cache.padding is not None:
                pad = np.array(cache.padding)  # read into memory (a CPU "device" would keep the map otherwise)
                self._lengths[modality] = (~pad).sum(axis=1)
                held[f"{modality}_padding"] = torch.from_numpy(pad).to(device)
        for key in ("targets", "mask", "clinical"):
            value = getattr(self.base, key)
            if value is not None:
                held[key] = value.to(device)
        self._held, self.resident_device = held, torch.device(device)

    def release(self) -> None:
        """Give the device memory back (the phase is over: stage 2 needs it); reads are memory-mapped again."""
        self._held, self._lengths, self.resident_device = {}, {}, None

    def __len__(self) -> int:
        return len(self.base)

    @property
    def targets(self) -> torch.Tensor:
        return self.base.targets

    @property
    def mask(self) -> torch.Tensor:
        return self.base.mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if self.resident_device is not None:
            return self._gather(indices)
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # sorted reads from the maps, then back in sampler order
        rows = idx[order]
        back = np.argsort(order, kind="stable")
        t_idx = torch.from_numpy(idx)
        batch = {"index": t_idx, "targets": self.base.targets[t_idx], "mask": self.base.mask[t_idx]}
        if self.base.clinical is not None:
            batch["clinical"] = self.base.clinical[t_idx]
        for modality, cache in self.caches.items():
            features = np.asarray(cache.features[rows])[back]
            padding = cache.padding
            if padding is not None:
                pad = np.asarray(padding[rows])[back]
                keep = padded_length(max(1, int((~pad).sum(axis=1).max())), self.buckets)
                pad, features = pad[:, :keep], features[:, :keep]
                if keep > pad.shape[1]:  # a bucket longer than the split's longest report
                    extra = keep - pad.shape[1]
                    pad = np.pad(pad, ((0, 0), (0, extra)), constant_values=True)
                    features = np.pad(features, ((0, 0), (0, extra), (0, 0)))
                batch["text_padding"] = torch.from_numpy(np.ascontiguousarray(pad))
            batch[f"{modality}_features"] = torch.from_numpy(np.ascontiguousarray(features))
        return batch

    def _gather(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A batch gathered from the arrays held on the device, in sampler order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        device, held = self.resident_device, self._held
        # pinned and asynchronous: a pageable copy would wait for every step queued on the GPU
        on = idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx
        batch = {"index": on, **{k: held[k][on] for k in ("targets", "mask", "clinical") if k in held}}
        for modality in self.caches:
            features = held[f"{modality}_features"]
            if modality not in self._lengths:
                batch[f"{modality}_features"] = features[on]
                continue
            keep = padded_length(max(1, int(self._lengths[modality][idx.numpy()].max())), self.buckets)
            width = min(keep, features.shape[1])
            features, pad = features[:, :width][on], held[f"{modality}_padding"][:, :width][on]
            if keep > width:  # a bucket longer than the split's longest report
                features = torch.nn.functional.pad(features, (0, 0, 0, keep - width))
                pad = torch.nn.functional.pad(pad, (0, keep - width), value=True)
            batch[f"{modality}_features"], batch["text_padding"] = features, pad
        return batch


def _copy_rows(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A memory-mapped array as one tensor on `device`, copied about HOLD_CHUNK_BYTES at a time."""
    out = torch.empty(array.shape, dtype=torch.from_numpy(array[:0].copy()).dtype, device=device)
    rows = max(1, HOLD_CHUNK_BYTES // max(1, array[:1].nbytes))
    for start in range(0, array.shape[0], rows):
        chunk = torch.from_numpy(np.array(array[start : start + rows]))  # read from the map into memory
        out[start : start + chunk.shape[0]].copy_(chunk)
    return out


def feature_cache_applies(cfg, phase_name: str, modalities: list[str]) -> tuple[bool, Optional[str]]:
    """Whether a phase trains from the cache, and why not when it could have (None: nothing to cache)."""
    if not any(m in CACHED_MODALITIES for m in modalities):
        return False, None
    if not cfg.data.feature_cache:
        return False, "data.feature_cache=false"
    if not cfg.phases[phase_name].freeze_encoders:
        return False, "the encoders train in this phase"
    if cfg.data.augment:
        return False, "data.augment=true: training inputs are random"
    return True, None


def cached_datasets(
    model, datasets: dict[str, MultimodalDataset], cfg, runtime, pad_id: int, hold: bool = True
) -> dict[str, Dataset]:
    """Each split served from the cache of every frozen pre-trained encoder of `model` (built by
    rank 0 where missing; the other ranks wait at a barrier and then read it), held in the device's
    memory as `data.feature_cache_on_device` says (`hold=False`: left memory-mapped; the benchmark
    times the build and the copy apart). The random state is left as it was, so training does not
    depend on whether this job built the cache."""
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        out = _cached_datasets(model, datasets, cfg, runtime, pad_id)
    if hold:
        hold_on_device(out, cfg.data.feature_cache_on_device, runtime)
    return out


def _cached_datasets(model, datasets: dict[str, MultimodalDataset], cfg, runtime, pad_id: int) -> dict[str, Dataset]:
    from mdfnet_hydra.config import CacheDtype, to_plain
    from mdfnet_hydra.distributed import barrier, node_index, refuse_unseen

    root = Path(cfg.paths.cache_dir).expanduser().resolve()
    dtype = CacheDtype(cfg.data.feature_cache_dtype).value
    batch_size = max(int(runtime.per_device_batch(cfg.trainer)) * 4, 64)
    out: dict[str, Dataset] = {}
    for split, dataset in datasets.items():
        caches: dict[str, FeatureArrays] = {}
        for modality, encoder in model.encoders.items():
            key = cache_key(encoder, to_plain(cfg.model[modality]), dataset, modality, runtime.precision.value, dtype)
            if runtime.is_main:

                def build(tmp: Path, e=encoder, d=dataset, m=modality) -> None:
                    compute_features(
                        e, d, m, tmp, runtime=runtime, data=cfg.data, dtype=dtype, batch_size=batch_size, pad_id=pad_id
                    )

                started = time.perf_counter()
                caches[modality], built = open_or_build(root, modality, key, build)
                log.info(
                    "feature cache %s/%s (%s, %s): %s in %.1fs",
                    modality,
                    split,
                    key[:12],
                    "x".join(map(str, caches[modality].meta["shape"])),
                    "built" if built else "reused",
                    time.perf_counter() - started,
                )
            barrier()  # the other ranks read what rank 0 found or built
            refuse_unseen(root / modality / key, "the feature cache", SHARED_CACHE, node_index(cfg))
            if not runtime.is_main:
                caches[modality] = FeatureArrays(root / modality / key)
        buckets = cfg.model.text.length_buckets if split == "train" else ()  # evaluation runs eagerly
        out[split] = CachedFeatureDataset(dataset, caches, buckets)
    return out


def hold_on_device(datasets: dict[str, CachedFeatureDataset], choice: Optional[bool], runtime) -> None:
    """Copy cached splits into the device's memory, in split order (training first): every split
    (`choice` true), none (false), or on a CUDA device each split that fits with those before it
    in DEVICE_SHARE of the GPU's memory, and in half of what is free now (null)."""
    device = runtime.device
    if choice is False or (choice is None and device.type != "cuda"):
        return
    budget = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = min(DEVICE_SHARE * total, free / 2)
    held = 0
    for split, dataset in datasets.items():
        size = dataset.nbytes
        if choice is None and held + size > budget:
            log.info(
                "feature cache %s stays memory-mapped: %.2f GB does not fit with %.2f GB held in %.1f GB (a "
                "quarter of the GPU's memory, at most half of what is free); data.feature_cache_on_device=true "
                "holds it anyway",
                split,
                size / 2**30,
                held / 2**30,
                budget / 2**30,
            )
            continue
        started = time.perf_counter()
        dataset.hold_on(device)
        held += size
        log.info(
            "feature cache %s held on %s: %.2f GB in %.1fs (batches gathered there, no loader)",
            split,
            device,
            size / 2**30,
            time.perf_counter() - started,
        )
