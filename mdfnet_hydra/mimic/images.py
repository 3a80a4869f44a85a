"""Resizing the chosen JPEGs once, so training never decodes full-size radiographs.

Each written JPEG carries the settings it was made with in its comment (`settings_stamp`), so a
re-run reuses only images made with the current `images.size` / `images.quality` and re-makes the
others; an image of an older preparation without the stamp is re-made too.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError

from mdfnet_hydra.files import atomic_target

STATUSES = ("done", "remade", "reused", "missing", "unreadable")


def settings_stamp(size: int, quality: int) -> bytes:
    return f"mdfnet-hydra prepare: images.size={size} images.quality={quality}".encode()


def resize_one(task: tuple[str, str, int, int]) -> tuple[str, str]:
    """(status, detail): "done", "remade" (existed, made with other settings), "reused" (already
    prepared with these settings), "missing" or "unreadable"."""
    src, dst, size, quality = task
    source, target = Path(src), Path(dst)
    stale = target.is_file()
    if stale and made_with(target, size, quality):
        return "reused", ""
    if not source.is_file():
        return "missing", f"no file {source}"
    try:
        with Image.open(source) as image:
            image.draft("L", (size, size))  # JPEG DCT scaling: decode at a fraction of full size
            image = image.convert("L")
            scale = size / min(image.size)
            if scale < 1:
                image = image.resize(
                    (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
                )
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return "unreadable", f"{source}: {type(err).__name__}: {err}"
    with atomic_target(target, durable=False) as tmp:  # never a half image to reuse; a full disk stops the run
        image.save(tmp, format="JPEG", quality=quality, comment=settings_stamp(size, quality))
    return ("remade" if stale else "done"), ""


def made_with(target: Path, size: int, quality: int) -> bool:
    """Whether a prepared image was written with these settings (reads the header only)."""
    try:
        with Image.open(target) as image:
            return image.info.get("comment") == settings_stamp(size, quality) and image.mode == "L"
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def resize_all(tasks: Iterable[tuple[str, str, int, int]], workers: int) -> list[tuple[str, str]]:
    tasks = list(tasks)
    if workers <= 1 or len(tasks) < 2:
        return [resize_one(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(resize_one, tasks, chunksize=64))
