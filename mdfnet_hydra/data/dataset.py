"""Splits of a prepared dataset and the torch Dataset that serves only the modalities in use."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from mdfnet_hydra.config import ConfigError, DataConfig
from mdfnet_hydra.data import cache_store
from mdfnet_hydra.data.manifest import SPLITS, ManifestError, label_matrix, read_manifest
from mdfnet_hydra.data.synthetic import ensure_synthetic
from mdfnet_hydra.data.targets import encode_targets
from mdfnet_hydra.data.token_cache import TokenIds
from mdfnet_hydra.files import write_text
from mdfnet_hydra.labels import CHEXPERT_LABELS
from mdfnet_hydra.machine import real_cpus
from mdfnet_hydra.tracking import private

log = logging.getLogger(__name__)

AUTO_VERIFY_MAX_IMAGES = 20_000  # data.verify_images=auto checks prepared datasets up to this size
SHOWN_FAILURES = 20  # unreadable images listed in one error; the rest are counted
RECORD_FORMAT = 1
REDO_HINT = (
    "delete the file(s) and rerun `python -m mdfnet_hydra.prepare` (it re-creates missing images), "
    "or drop their rows from the manifest"
)


class UnreadableImageError(OSError):
    """An image of the dataset cannot be decoded; the message names the file and its sample id."""


@dataclass
class SplitData:
    """One split's rows with their encoded targets; `group` indexes patients within the split."""

    name: str
    frame: pd.DataFrame
    targets: np.ndarray
    mask: np.ndarray
    raw_labels: np.ndarray

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def group(self) -> np.ndarray:
        return pd.factorize(self.frame["patient_id"])[0]


def resolve_root(data: DataConfig) -> Path:
    """The dataset directory, generating the synthetic dataset there on first use."""
    root = Path(data.root).expanduser().resolve()
    if data.synthetic is not None:
        ensure_synthetic(root, data.synthetic.num_samples, data.synthetic.image_size, data.synthetic.seed)
    return root


def load_splits(data: DataConfig, seed: int) -> tuple[Path, dict[str, SplitData]]:
    root = resolve_root(data)
    frame = read_manifest(root / data.manifest)
    check_images(root, root / data.manifest, frame, data)
    splits: dict[str, SplitData] = {}
    for name in SPLITS:
        part = frame[frame["split"] == name]
        if data.small_sample is not None and len(part) > data.small_sample:
            part = part.sample(n=data.small_sample, random_state=seed).sort_index()
        part = part.reset_index(drop=True)
        raw = label_matrix(part)
        targets, mask = encode_targets(raw, data.labels.uncertain, data.labels.blank)
        splits[name] = SplitData(name, part, targets, mask, raw)
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
        raise ManifestError(f"{root / data.manifest}: the train and val splits must not be empty (rows: {sizes})")
    for name in ("train", "val"):  # nothing to learn from, or nothing to select checkpoints on
        if not splits[name].mask.any():
            raise ManifestError(
                f"{root / data.manifest}: the {name} split has no usable label: every CheXpert label of its "
                f"{len(splits[name])} rows is empty or masked (data.labels.blank={_value(data.labels.blank)}, "
                f"data.labels.uncertain={_value(data.labels.uncertain)}"
                + (f", after data.small_sample={data.small_sample}" if data.small_sample is not None else "")
                + ")"
            )
    return root, splits


def _value(option) -> str:
    return str(getattr(option, "value", option))


def label_warnings(splits: dict[str, SplitData]) -> list[str]:
    """What the splits' labels leave out that a run's mean AUROC would hide: labels without one
    usable training target (their outputs never train, yet count in the validation and test mean
    where those splits have them), a validation split on which no AUROC is defined (nothing selects
    the best epoch) and a test split without labels (no test metrics)."""
    warnings = []
    untrained = [label for label, used in zip(CHEXPERT_LABELS, splits["train"].mask.any(axis=0)) if not used]
    if untrained:
        warnings.append(
            f"{len(untrained)} label(s) have no usable target in the train split (empty or masked): "
            f"{', '.join(untrained)}; their outputs do not train, yet count in the validation and test mean AUROC"
        )
    if not _both_classes(splits["val"]).any():
        warnings.append(
            "no label of the val split has both a positive and a negative usable target: every validation AUROC "
            "is undefined, so no epoch is best by it (the last epoch's checkpoint is taken)"
        )
    if len(splits["test"]) == 0:
        warnings.append("the test split is empty: this run reports no test metrics")
    elif not splits["test"].mask.any():
        warnings.append("the test split has no usable label (empty or masked): this run reports no test AUROC")
    return warnings


def _both_classes(split: SplitData) -> np.ndarray:
    """Per label: whether the split's usable targets hold both classes (an AUROC is defined)."""
    used = split.mask > 0
    positive = (used & (split.targets > 0.5)).any(axis=0)
    negative = (used & (split.targets <= 0.5)).any(axis=0)
    return positive & negative


# ---------------------------------------------------------------- one-time image check
def wants_image_check(data: DataConfig, n_images: int) -> bool:
    """`data.verify_images`: true, false, or auto (prepared datasets small enough to decode at start;
    the synthetic dataset is generated here and never needs it)."""
    value = str(data.verify_images).lower()
    if value not in ("auto", "true", "false"):
        raise ConfigError(f"data.verify_images must be auto, true or false, got {data.verify_images!r}")
    if value == "auto":
        return data.synthetic is None and n_images <= AUTO_VERIFY_MAX_IMAGES
    return value == "true"


def check_images(root: Path, manifest: Path, frame: pd.DataFrame, data: DataConfig) -> None:
    """Decode every image of the manifest once, so a damaged file fails the job at start with all
    such files listed, not an hour into an epoch one at a time. A pass is recorded beside the
    manifest (keyed by the size and mtime of the manifest and every image), so later jobs skip it."""
    images = frame.drop_duplicates("image_path")
    if not wants_image_check(data, len(images)):
        if data.synthetic is None and str(data.verify_images).lower() == "auto":
            log.info(
                "data.verify_images=auto: %d images (more than %d), not decoded at start; "
                "data.verify_images=true checks them",
                len(images),
                AUTO_VERIFY_MAX_IMAGES,
            )
        return
    record = manifest.with_name(f".{manifest.name}.images-verified.json")
    key = files_key(root, manifest, images["image_path"])
    if recorded(record, key):
        log.info("images of %s: decoded by an earlier job (%s), not checked again", manifest, record.name)
        return
    with ExitStack() as stack:
        try:  # concurrent jobs (sweep trials, DDP ranks) wait for one check instead of repeating it
            stack.enter_context(cache_store.exclusive(record.with_suffix(".lock")))
        except OSError:
            pass  # a read-only dataset directory: check without the lock
        if recorded(record, key):
            return
        decode_all(root, manifest, images)
        try:
            write_text(
                record,
                json.dumps(
                    {
                        "format": RECORD_FORMAT,
                        "key": key,
                        "images": len(images),
                        "checked": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    }
                ),
            )
        except OSError as err:
            log.warning(
                "images decoded, but the check could not be recorded (%s): it runs again in the "
                "next job; data.verify_images=false skips it",
                err,
            )


def files_key(root: Path, manifest: Path, image_paths: pd.Series) -> str:
    """SHA-256 over the manifest's and every image's path, size and modification time."""
    h = hashlib.sha256(f"{RECORD_FORMAT}|{manifest.resolve()}|{_stat(manifest)}\n".encode())
    for rel in image_paths:
        h.update(f"{rel}|{_stat(root / rel)}\n".encode())
    return h.hexdigest()


def _stat(path: Path) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}|{stat.st_mtime_ns}"


def recorded(record: Path, key: str) -> bool:
    """Whether an earlier job recorded a passed check for exactly these files."""
    try:
        return json.loads(record.read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def decode_error(path: Path) -> Optional[str]:
    """Why `path` does not fully decode, or None. Opening reads only the header; `load` decodes."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:  # OSError (truncated, missing), UnidentifiedImageError, decompression bombs...
        return error_text(err, path)
    return None


def unreadable_image(split: SplitData, index: int, path: Path, err: BaseException) -> UnreadableImageError:
    """The error for an image of `split` that cannot be read: its path and sample id marked private
    (the console shows them, files never get them), Pillow's or the OS's reason without the path."""
    sample_id = split.frame["sample_id"].iat[index]
    return UnreadableImageError(
        f"cannot read image {private(str(path))} (sample_id {private(repr(str(sample_id)))}) of the {split.name} "
        f"split: {error_text(err, path)}; {REDO_HINT}. data.verify_images=true decodes every image at start "
        f"and lists all that fail"
    )


def error_text(err: BaseException, path: Path) -> str:
    """`Type: message` without the file's path (it names the patient; callers mark it private)."""
    return f"{type(err).__name__}: {str(err).replace(str(path), 'the file')}"


def decode_all(root: Path, manifest: Path, images: pd.DataFrame) -> None:
    """Decode every image (threads: Pillow decodes without the GIL); raise one error listing the
    first SHOWN_FAILURES failures with row, sample id and path."""
    started = time.perf_counter()
    log.info("decoding the %d images of %s once to check them (data.verify_images)", len(images), manifest)
    paths = [root / rel for rel in images["image_path"]]
    with ThreadPoolExecutor(max_workers=min(8, real_cpus())) as pool:
        errors = list(pool.map(decode_error, paths))
    failed = [
        (row, sid, path, err)
        for row, sid, path, err in zip(images.index, images["sample_id"], paths, errors)
        if err is not None
    ]
    if failed:
        lines = [
            f"  row {row}, sample_id {private(repr(str(sid)))}: {private(str(path))}: {err}"
            for row, sid, path, err in failed[:SHOWN_FAILURES]
        ]
        if len(failed) > SHOWN_FAILURES:
            lines.append(f"  ... and {len(failed) - SHOWN_FAILURES} more")
        raise UnreadableImageError(
            f"{len(failed)} of the {len(paths)} images of {manifest} cannot be decoded: {REDO_HINT} "
            f"(data.verify_images=false skips this check):\n" + "\n".join(lines)
        )
    log.info("all %d images decode (%.0fs)", len(paths), time.perf_counter() - started)


# ---------------------------------------------------------------- the torch dataset
class MultimodalDataset(Dataset):
    """Items hold only what the chosen modalities need: no image is decoded for a text-only run."""

    def __init__(
        self,
        split: SplitData,
        root: Path,
        image_transform: Optional[Callable[[Image.Image], torch.Tensor]] = None,
        token_ids: Optional[TokenIds] = None,
        clinical: Optional[np.ndarray] = None,
    ) -> None:
        self.split = split
        self.image_paths = [root / p for p in split.frame["image_path"]] if image_transform else None
        self.image_transform = image_transform
        self.token_ids = token_ids
        self.clinical = torch.from_numpy(clinical) if clinical is not None else None
        self.targets = torch.from_numpy(split.targets)
        self.mask = torch.from_numpy(split.mask)

    def __len__(self) -> int:
        return len(self.split)

    def restricted_to(self, modality: str) -> "MultimodalDataset":
        """A view serving only one modality's inputs (what one encoder reads), targets included."""
        view = copy.copy(self)
        view.image_paths = self.image_paths if modality == "vision" else None
        view.token_ids = self.token_ids if modality == "text" else None
        view.clinical = self.clinical if modality == "clinical" else None
        return view

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"index": torch.tensor(index), "targets": self.targets[index], "mask": self.mask[index]}
        if self.image_paths is not None:
            item["image"] = self.image(index)
        if self.token_ids is not None:
            item["input_ids"] = self.token_ids[index]
        if self.clinical is not None:
            item["clinical"] = self.clinical[index]
        return item

    def image(self, index: int) -> torch.Tensor:
        """The transformed image; a file that cannot be read fails naming itself and its sample id
        (Pillow's own error, e.g. "image file is truncated", names neither)."""
        path = self.image_paths[index]
        try:
            with Image.open(path) as image:
                return self.image_transform(image)
        except OSError as err:
            raise unreadable_image(self.split, index, path, err) from err


def padded_length(longest: int, buckets: Sequence[int] = ()) -> int:
    """The length a batch's token ids are padded to: the smallest of `buckets` that holds its longest
    sequence (fixed shapes: one compiled graph per bucket), or that longest length without buckets."""
    return next((int(b) for b in buckets if int(b) >= longest), longest)


class Collator:
    """Stacks tensors and pads token ids to the batch's longest sequence, or up to the smallest
    length bucket that holds it (`model.text.length_buckets`), never to max_length."""

    def __init__(self, pad_id: int = 0, buckets: Sequence[int] = ()) -> None:
        self.pad_id = pad_id
        self.buckets = tuple(int(b) for b in buckets)

    def without_buckets(self) -> "Collator":
        """For evaluation passes, which run eagerly: padding to the batch's longest costs least."""
        return Collator(self.pad_id)

    def __call__(self, items: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(items, dict):  # already a batch (datasets with __getitems__)
            return items
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "input_ids"}
        if "input_ids" in items[0]:
            seqs = [it["input_ids"] for it in items]
            ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)
            width = padded_length(ids.shape[1], self.buckets)
            ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad_id)
            lengths = torch.tensor([len(s) for s in seqs])
            batch["input_ids"] = ids
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return batch
