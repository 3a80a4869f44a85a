"""SIGTERM as an exception: what scancel, a SLURM time limit or preemption and torch's elastic
agent (stopping its workers) send. Python's default ends the process at once, so the run's log
never says why it stopped; raised instead, the job unwinds as it does on Ctrl-C."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

# signals whose Python handler may end the job from wherever it lands: Ctrl-C, `Terminated`,
# submitit's requeue on SIGUSR2 (it calls sys.exit in the handler) and a user's SIGUSR1 handler
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


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


@contextmanager
def signals_held() -> Iterator[None]:
    """Within the block, `HELD_SIGNALS` that have a Python handler are held and handled, once each,
    when it ends. For writes that an exception must not cut short: torch.save's zip writer, cut by
    submitit's exit on the requeue signal, reports the broken write as its own RuntimeError ("unexpected
    pos"), which replaced the exit and failed the requeued trial (CI, 2026-11-28). Signals with the
    default or ignore disposition are left alone (the atomic write survives a kill). Only in the main
    thread, where Python runs handlers and can set them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        arrived.append(signum)

    before = {}
    try:
        for signum in HELD_SIGNALS:
            if callable(signal.getsignal(signum)):
                before[signum] = signal.signal(signum, hold)
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)
