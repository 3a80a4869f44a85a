"""Resizing the chosen JPEGs once, so training never decodes full-size radiographs.

Every image is written as 8-bit grayscale with its shorter side at `images.size` (smaller images are
scaled up: the model expects that size). A 16- or 32-bit image (mode I;16, I or F) is mapped linearly
from its own darkest to its brightest pixel onto 0-255: converting it as PIL does clips every value
above 255 to white.

Each written JPEG carries the settings it was made with in its comment (`settings_stamp`), so a
re-run reuses only images made with the current `images.size` / `images.quality` and re-makes the
others; an image of an older preparation without the stamp is re-made too.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from mdfnet_hydra.files import atomic_target
from mdfnet_hydra.signals import signals_held

STATUSES = ("done", "remade", "reused", "missing", "unreadable")
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel
PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
            image = resized(to_8bit(image), size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return "unreadable", f"{source}: {type(err).__name__}: {err}"
    with atomic_target(target, durable=False) as tmp:  # never a half image to reuse; a full disk stops the run
        image.save(tmp, format="JPEG", quality=quality, comment=settings_stamp(size, quality))
    return ("remade" if stale else "done"), ""


def to_8bit(image: Image.Image) -> Image.Image:
    """Grayscale, 8 bits: a wide image linearly from its own range (min to max), others as PIL converts."""
    if image.mode not in WIDE_MODES:
        return image.convert("L")
    pixels = np.asarray(image, dtype=np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"mode {image.mode} image holds values that are not finite")
    scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def resized(image: Image.Image, size: int) -> Image.Image:
    """The shorter side at `size`, up or down, the aspect ratio kept."""
    scale = size / min(image.size)
    if scale == 1:
        return image
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(shape, Image.Resampling.BICUBIC)


def made_with(target: Path, size: int, quality: int) -> bool:
    """Whether a prepared image was written with these settings (reads the header only)."""
    try:
        with Image.open(target) as image:
            return image.info.get("comment") == settings_stamp(size, quality) and image.mode == "L"
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def resize_all(tasks: Iterable[tuple[str, str, int, int]], workers: int) -> list[tuple[str, str]]:
    """Each task's (status, detail), in order. Workers die with this process (also when it is killed
    with SIGKILL), and are stopped at once when it stops early (SIGTERM, Ctrl-C, an error)."""
    tasks = list(tasks)
    if workers <= 1 or len(tasks) < 2:
        return [resize_one(t) for t in tasks]
    pool = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        # the workers start (fork) at the first submit, and map submits every chunk at once: a stop
        # signal there left a forked worker the pool had not yet recorded, which the process then
        # waited for at exit, forever (or broke the pool's pipes: EBADF), so it waits for the starts
        with signals_held():
            results = pool.map(resize_one, tasks, chunksize=64)
        return list(results)
    except BaseException:
        recorded = list((getattr(pool, "_processes", None) or {}).values())
        for process in {*recorded, *multiprocessing.active_children()}:
            process.kill()  # queued work would otherwise run to its end before shutdown returns
        manager = getattr(pool, "_executor_manager_thread", None)  # (shutdown forgets it)
        pool.shutdown(wait=False, cancel_futures=True)
        if manager is not None:
            # its clean-up closes the pool's wake-up pipe; running on into the interpreter's exit, it
            # raced Python 3.11's exit hook writing to that pipe (EBADF on stderr after our last line)
            manager.join(timeout=30)
        raise
    finally:
        pool.shutdown(wait=True)


def die_with_parent(parent: int) -> None:
    """A resizing worker's initializer. Killed with the preparing process (Linux: the kernel sends
    SIGKILL when it dies; a worker left behind would run on, reparented, for hours), ended by SIGTERM
    at once, deaf to Ctrl-C (the preparing process handles it and stops the workers)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked: not the parent's unwinding handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
