"""Files a later run trusts are written whole or not at all, and a failed write says why and where.

Every artefact that a rerun, a requeued SLURM job or the evaluation reads (checkpoints,
metrics.json, saved predictions, the run record) is written to a hidden temporary name beside its
target (`.<name>.tmp-<host>-<pid>`), flushed to disk and renamed over the target: a job killed
mid-write, or a disk that fills up, leaves the previous file (or none), never a truncated one.
Temporaries of writers that were killed are removed by `remove_stale_temporaries` at the next start.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional, Union

log = logging.getLogger(__name__)

_TMP = re.compile(r"^\..+\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
_HOST = socket.gethostname()
FOREIGN_TEMPORARY_AGE_S = 3600  # a temporary of another host's writer is stale after this


class DiskFullError(OSError):
    """No space left where a file had to be written; the message names the file and the free space."""


class DamagedFileError(RuntimeError):
    """A file a run relies on exists but cannot be read (truncated, not the expected format)."""


def temporary_name(path: Path) -> Path:
    """Unique per writer, also across hosts that share the file system (pids repeat there)."""
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


@contextmanager
def atomic_target(path: Union[str, Path], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one rename.

    A failure removes the temporary and leaves `path` as it was; a full disk or quota (however the
    writer reports it: OSError ENOSPC / EDQUOT, or torch's `enforce fail at inline_container.cc`)
    becomes a `DiskFullError` naming the target. `durable=False` skips the fsync (the rename alone
    is safe against a killed job; the fsync guards against a lost node), for many small files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and is_disk_full(err, path.parent)
        message = no_space_message(path) if full else ""  # the free space before the temporary goes
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(errno.ENOSPC, message) from err
        raise


def write_text(path: Union[str, Path], text: str) -> Path:
    with atomic_target(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: Union[str, Path], data: bytes) -> Path:
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def is_disk_full(err: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space. torch.save reports a full disk as a RuntimeError
    from its zip writer without an errno, so a writer error with (almost) no space left counts too."""
    for cause in error_chain(err):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    if isinstance(err, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(directory).free < 1 << 20
        except OSError:
            return False
    return False


def no_space_message(path: Path) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return (
        f"no space left on device: writing {path} failed ({free} on its file system, or a quota is "
        f"full). Free space there and rerun the same command: it resumes."
    )


def remove_stale_temporaries(directory: Union[str, Path]) -> list[Path]:
    """Delete `.<name>.tmp-<pid>` files under `directory` left by writers that are no longer running.

    Called by a job that holds its run directory's lock, so no live writer of this run is there.
    A temporary of this host is stale when its pid is gone; one of another host (a job on another
    node of a shared file system) when it has not changed for an hour.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.rglob(".*.tmp-*"):
        match = _TMP.match(path.name)
        if not match or not _stale(path, match.group("host"), int(match.group("pid"))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of killed writers under %s", len(removed), directory)
    return removed


def _stale(path: Path, host: Optional[str], pid: int) -> bool:
    if host is None or host == _HOST:
        return not _alive(pid)
    try:
        return time.time() - path.stat().st_mtime > FOREIGN_TEMPORARY_AGE_S
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    if path.is_file():
        with path.open("rb+") as handle:
            os.fsync(handle.fileno())


def error_chain(err: BaseException) -> Iterator[BaseException]:
    """An error, then the errors it was raised from or while handling, each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


# ------------------------------------------------------------------------------------------ locks
# Open files whose flock this process holds. A forked child (a DataLoader worker) inherits the open
# file, and a flock lasts until every process holding it has closed it: a job killed with SIGKILL
# would leave its run directory or cache locked until its workers noticed, seconds later (or never,
# for a hung worker). Each forked child lets go of its copies at once.
_HELD_LOCKS: dict[int, IO] = {}


def hold_lock(handle: IO) -> IO:
    """Mark an opened lock file, before it is locked: no child forked from then on keeps its lock."""
    _HELD_LOCKS[id(handle)] = handle
    return handle


def release_lock(handle: IO) -> None:
    """Unlock and close a file `hold_lock` marked (unlocked explicitly: a copy some child still holds,
    forked where Python's at-fork hooks do not run, does not keep the lock)."""
    _HELD_LOCKS.pop(id(handle), None)
    if handle.closed:
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except OSError:
        pass  # a file system without locks, or a file never locked
    handle.close()


def _let_go_of_inherited_locks() -> None:
    """In a forked child: point each inherited lock's descriptor at /dev/null, so the child no
    longer refers to the locked file (the parent keeps its lock; the child's file objects stay valid)."""
    for handle in list(_HELD_LOCKS.values()):
        if handle.closed:
            continue
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null, handle.fileno(), inheritable=False)
        finally:
            os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_let_go_of_inherited_locks)
