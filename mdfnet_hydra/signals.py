"""SIGTERM as an exception: what scancel, a SLURM time limit or preemption and torch's elastic
agent (stopping its workers) send. Python's default ends the process at once, so the run's log
never says why it stopped; raised instead, the job unwinds as it does on Ctrl-C."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (scancel, a SLURM time limit or preemption, torch's elastic agent stopping its
    workers) raised as an exception, so the job unwinds as it does on Ctrl-C: files being written
    are left whole or not at all, and the run's log says what stopped it."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` in the main thread (Python's default ends the
    process at once, leaving the run's log without a line on why); outside it, as before. Only
    where SIGTERM has Python's default: a handler someone installed stays (submitit's job
    environment ignores the SIGTERM that comes with its own timeout requeue, which it handles on
    SIGUSR2; raising there broke the requeue)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not (
        signal.SIG_DFL
    ):
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
