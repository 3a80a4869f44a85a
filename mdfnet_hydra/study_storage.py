"""Opening an Optuna study's storage the same way in the sweep process and in its jobs (which
report to their trials for pruning: pruning.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

SQLITE_TIMEOUT_S = 120.0  # how long a SQLite writer waits for another process's write


def sqlite_path(url: str) -> Optional[Path]:
    """The database file of a `sqlite:///` URL (None for other URLs and in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def open_storage(storage: Any) -> Any:
    """SQLite URLs as an RDBStorage that waits for other writers; anything else as given."""
    if isinstance(storage, str) and sqlite_path(storage) is not None:
        import optuna

        connect_args = {} if "timeout=" in storage else {"timeout": SQLITE_TIMEOUT_S}
        return optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": connect_args})
    return storage
