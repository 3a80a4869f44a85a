"""Rank-0-only run records: the `logs/train.log` file handler and the TensorBoard writer.

Only numbers and label names are ever logged: no report text, no patient or sample identifiers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional

LOG_FORMAT = "[%(asctime)s][%(levelname)s] %(message)s"


def attach_log_file(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return handler


def log_failure(handler: Optional[logging.Handler], err: BaseException) -> None:
    """The error that ends a job, with its traceback, into the run's log file only (the console
    already shows it); Ctrl-C as one line."""
    if handler is None:
        return
    interrupted = isinstance(err, KeyboardInterrupt)
    record = logging.LogRecord(
        "mdfnet_hydra", logging.ERROR, __file__, 0,
        "interrupted (Ctrl-C / SIGINT); rerun the same command to resume" if interrupted else "job failed: %s: %s",
        None if interrupted else (type(err).__name__, err), None if interrupted else (type(err), err, err.__traceback__),
    )
    handler.handle(record)


def detach_log_file(handler: Optional[logging.Handler]) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


class Tracker:
    """TensorBoard scalars plus the stage's log file; a no-op on ranks other than 0."""

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.handler = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.handler = attach_log_file(directory / "logs" / "train.log")
            self.writer = SummaryWriter(log_dir=str(directory / "tensorboard"))

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
