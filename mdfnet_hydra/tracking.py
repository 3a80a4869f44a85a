"""Rank-0-only run records: the `logs/train.log` file handler and the TensorBoard writer.

Only numbers and label names are ever logged: no report text, no patient or sample identifiers.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Optional

LOG_FORMAT = "[%(asctime)s][%(levelname)s] %(message)s"
_PRIVATE = re.compile("\u2039[^\u203a]*\u203a")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".dcm", ".bmp", ".webp")


def attach_log_file(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return handler


def private(text: str) -> str:
    """Mark the part of an error message that names patients or their files (an unreadable image's
    path and sample id, a patient in two splits): the console shows it, files never get it. A mark
    in the text itself survives what an attribute would not (DataLoader workers re-raise errors from
    their message)."""
    return f"\u2039{text}\u203a"


def _chain(err: BaseException) -> list[BaseException]:
    """The error, every error it was raised from or while handling, and those an ExceptionGroup holds."""
    seen: list[BaseException] = []
    pending: list[Optional[BaseException]] = [err]
    while pending:
        e = pending.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        pending += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return seen


def public_text(text: str, err: BaseException) -> str:
    """`text` (an error's message or traceback, or a message built from them) without what names
    patients: every part of the error chain's messages marked `private`, wherever else it occurs (a
    cause's own message, a DataLoader worker's traceback copied into the message), and the file
    names its OSErrors carry where the chain is about patient data (something in it is marked) or the
    file is an image (a missing image's `FileNotFoundError`, raised by `open` or `os.stat` before our
    code could name it privately). A marked part under 3 characters is withheld only where marked:
    replaced everywhere it would garble the rest."""
    chain = _chain(err)
    secrets = {m.group(0)[1:-1] for e in chain for m in _PRIVATE.finditer(str(e))}
    for e in chain:
        if isinstance(e, OSError):
            names = [str(name) for name in (e.filename, e.filename2) if name not in (None, "")]
            secrets.update(n for n in names if secrets or n.lower().endswith(_IMAGE_SUFFIXES))
    text = _PRIVATE.sub("\u2039withheld\u203a", text)
    for secret in sorted((s for s in secrets if len(s.strip()) >= 3), key=len, reverse=True):
        for form in (secret, repr(secret)[1:-1]):
            text = text.replace(form, "\u2039withheld\u203a")
    return text


def public_message(err: BaseException) -> str:
    """The error's message as logs, failure.json and sweep summaries may hold it."""
    return public_text(str(err), err)


def public_traceback(err: BaseException) -> str:
    import traceback

    return public_text("".join(traceback.format_exception(type(err), err, err.__traceback__)), err)


def log_failure(handler: Optional[logging.Handler], err: BaseException) -> None:
    """The error that ends a job, with its traceback, into the run's log file only (the console
    already shows it); Ctrl-C as one line."""
    if handler is None:
        return
    from mdfnet_hydra.signals import Terminated

    if isinstance(err, Terminated):
        message = "terminated (SIGTERM: scancel, a time limit or preemption); rerun the same command to resume"
    elif isinstance(err, KeyboardInterrupt):
        message = "interrupted (Ctrl-C / SIGINT); rerun the same command to resume"
    else:
        message = f"job failed: {type(err).__name__}: {public_message(err)}\n{public_traceback(err)}"
    handler.handle(logging.LogRecord("mdfnet_hydra", logging.ERROR, __file__, 0, "%s", (message,), None))


def detach_log_file(handler: Optional[logging.Handler]) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


class Tracker:
    """TensorBoard scalars plus the stage's log file; a no-op on ranks other than 0.

    The log file is attached at once; the event file once the phase knows where it resumes
    (`open_events`), so scalars a killed job logged past its last checkpoint, which the resumed
    job logs again, are purged from TensorBoard's view instead of drawn twice."""

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.directory = directory
        self.writer = None
        self.handler = attach_log_file(directory / "logs" / "train.log") if enabled else None

    def open_events(self, resumed_step: int) -> None:
        """Start the event file. `resumed_step`: the last training step of the state the phase
        resumed from (0: a fresh start, after a job killed in its first epoch too); TensorBoard
        hides events at later steps written before. (Epoch scalars count epochs, far below any
        step of theirs: never hidden, but for the epoch a job was killed in.)"""
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.directory / "tensorboard"), purge_step=resumed_step + 1)

    def flush(self) -> None:
        """Put what is buffered on disk (the writer flushes every 2 minutes): called once an epoch's
        checkpoint is saved, so a killed job's scalars cover the epochs it will not train again."""
        if self.writer is not None:
            self.writer.flush()

    def scalar(self, tag: str, value: Optional[float], step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, prefix: str, values: Mapping[str, Optional[float]], step: int) -> None:
        for key, value in values.items():
            self.scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        detach_log_file(self.handler)
