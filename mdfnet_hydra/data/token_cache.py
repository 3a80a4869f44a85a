"""Token ids: computed once per (tokenizer, max length, text) and shared by every job on disk.

Tokenising MIMIC-scale report text takes tens of seconds per job, and every trial of a sweep and
every rank of a DDP job would redo it. The ids are stored once under
`paths.cache_dir/tokens/<key>/` as one flat int32 array plus row offsets, memory-mapped on read.
The key digests the tokenizer itself (its full serialised pipeline: vocabulary, normaliser,
pre-tokeniser, special-token post-processor, plus the truncation side), the max length and every
row's text, so a changed input never reuses stale ids. Building and sharing follow
data/cache_store.py (one job builds under a lock; the others wait and read).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from mdfnet_hydra.data import cache_store

log = logging.getLogger(__name__)

FORMAT = 1
KIND = "tokens"


class TokenIds(Sequence[torch.Tensor]):
    """Each row's token ids (a long tensor), held as one flat array and offsets, in memory or
    memory-mapped from a cache directory (DataLoader workers then open their own maps)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, directory: Optional[Path] = None) -> None:
        self._flat, self._offsets, self.directory = flat, offsets, directory

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> "TokenIds":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def open(cls, directory: Path) -> "TokenIds":
        return cls(np.load(directory / "ids.npy", mmap_mode="r"), np.load(directory / "offsets.npy"), directory)

    def save(self, directory: Path) -> None:
        np.save(directory / "ids.npy", np.asarray(self._flat))
        np.save(directory / "offsets.npy", self._offsets)

    def __getstate__(self) -> dict:
        if self.directory is not None:  # reopened in the worker, not copied through a pipe
            return {"directory": self.directory, "_offsets": self._offsets, "_flat": None}
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._flat is None:
            self._flat = np.load(self.directory / "ids.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self._offsets[index], self._offsets[index + 1]
        return torch.from_numpy(self._flat[start:end].astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self._offsets)

    def digest(self) -> str:
        """SHA-256 of every row's ids (and the row boundaries)."""
        h = hashlib.sha256(self._offsets.astype(np.int64).tobytes())
        h.update(np.ascontiguousarray(self._flat, dtype=np.int32).tobytes())
        return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """What determines a fast tokenizer's ids: its serialised pipeline and truncation side. The
    backend's truncation and padding state is left out: it records the last call's arguments."""
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    pipeline.pop("truncation", None)
    pipeline.pop("padding", None)
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(pipeline, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "truncation_side", "right")).encode())
    return h.hexdigest()


def token_key(tokenizer, texts: Sequence[str], max_length: int) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, "max_length": int(max_length)}).encode())
    h.update(tokenizer_digest(tokenizer).encode())
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def cache_dir(cfg) -> Optional[Path]:
    """Where a job's token ids are shared (`paths.cache_dir`), or None with `data.token_cache=false`."""
    return Path(str(cfg.paths.cache_dir)) if cfg.data.token_cache else None


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> TokenIds:
    return TokenIds.from_lists(tokenizer(list(texts), truncation=True, max_length=int(max_length))["input_ids"])


def token_ids(
    tokenizer, texts: Sequence[str], max_length: int, cache_dir: Optional[Path] = None, split: str = ""
) -> TokenIds:
    """The rows' token ids, from `cache_dir/tokens/<key>` (built there first where missing), or
    tokenised in memory when `cache_dir` is None."""
    if cache_dir is None:
        return tokenize(tokenizer, texts, max_length)
    started = time.perf_counter()
    key = token_key(tokenizer, texts, max_length)

    def build(tmp: Path) -> None:
        ids = tokenize(tokenizer, texts, max_length)
        ids.save(tmp)
        meta = {
            "format": FORMAT,
            "rows": len(ids),
            "tokens": int(ids.lengths.sum()),
            "max_length": int(max_length),
            "seconds": round(time.perf_counter() - started, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    directory, built = cache_store.open_or_build(Path(cache_dir).expanduser().resolve(), KIND, key, build)
    log.info(
        "token ids %s (%s, %d rows): %s in %.1fs",
        split or "split",
        key[:12],
        len(texts),
        "built" if built else "reused",
        time.perf_counter() - started,
    )
    return TokenIds.open(directory)
