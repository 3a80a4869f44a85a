"""Resizing the chosen JPEGs once, so training never decodes full-size radiographs."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError


def resize_one(task: tuple[str, str, int, int]) -> tuple[str, str]:
    """(status, detail): "done", "reused" (already prepared), "missing" or "unreadable"."""
    src, dst, size, quality = task
    source, target = Path(src), Path(dst)
    if target.is_file():
        return "reused", ""
    if not source.is_file():
        return "missing", f"no file {source}"
    try:
        with Image.open(source) as image:
            image.draft("L", (size, size))  # JPEG DCT scaling: decode at a fraction of full size
            image = image.convert("L")
            scale = size / min(image.size)
            if scale < 1:
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.Resampling.BICUBIC)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            image.save(tmp, format="JPEG", quality=quality)
            tmp.replace(target)  # a run killed mid-write leaves no half image to be "reused"
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return "unreadable", f"{source}: {type(err).__name__}: {err}"
    return "done", ""


def resize_all(tasks: Iterable[tuple[str, str, int, int]], workers: int) -> list[tuple[str, str]]:
    tasks = list(tasks)
    if workers <= 1 or len(tasks) < 2:
        return [resize_one(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(resize_one, tasks, chunksize=64))
