"""A directory built once and shared by every job that needs it (feature caches, token ids).

The builder holds an exclusive lock on `<kind>/<key>.lock` (other jobs wait on it and then read),
writes into a private temporary directory and renames it into place, which is atomic; `meta.json`
is written last. A directory named `<key>` is therefore always complete, even where locks do not
work (some network file systems): at worst two jobs then both build it and one copy stays.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from mdfnet_hydra.files import hold_lock, release_lock

log = logging.getLogger(__name__)


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path`, waited for (and the wait logged) when another job holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = hold_lock(open(lock_path, "a+"))  # the build's forked DataLoader workers do not keep it
    try:
        waited = time.perf_counter()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("cache %s/%s is being built by another job; waiting", lock_path.parent.name, lock_path.stem)
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("waited %.0fs for cache %s", time.perf_counter() - waited, lock_path.stem)
        yield
    finally:
        release_lock(handle)


def is_complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def open_or_build(root: Path, kind: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The complete directory `root/kind/key`, and whether this call built it with `build(tmp_dir)`
    (which must write `meta.json` last)."""
    final = root / kind / key
    if is_complete(final):
        return final, False
    with exclusive(root / kind / f"{key}.lock"):
        if is_complete(final):  # another job built it while we waited
            return final, False
        tmp = final.with_name(f"{key}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # built concurrently without a working lock: theirs is as good
                if not is_complete(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, True
