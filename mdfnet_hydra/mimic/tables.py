"""Finding and reading MIMIC's CSV tables (gzip or plain) with errors that name the file and row."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd


class PrepareError(ValueError):
    """Input the preparation cannot use; the message names the file (and row) to fix."""


def find_table(root: str | Path, stem: str, subdirs: Sequence[str] = ("",)) -> Path:
    """`<root>[/<subdir>]/<stem>.csv.gz` or `.csv`, whichever exists."""
    root = Path(root).expanduser()
    tried = []
    for sub in subdirs:
        for suffix in (".csv.gz", ".csv"):
            path = root / sub / f"{stem}{suffix}"
            tried.append(str(path))
            if path.is_file():
                return path
    raise PrepareError(f"cannot find the {stem} table; looked for: {', '.join(tried)}")


def read_table(path: Path, required: Iterable[str], dtype: dict | None = None) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=dtype, low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as err:
        raise PrepareError(f"{path}: cannot be read as CSV ({type(err).__name__}: {err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise PrepareError(f"{path}: missing columns {missing}; found {list(frame.columns)}")
    return frame


def numeric_column(frame: pd.DataFrame, column: str, path: Path, allow_text: bool = False) -> pd.Series:
    """A column as floats. Free text (e.g. a pain score of "unable") becomes NaN when allowed;
    otherwise the first offending row is named."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() & frame[column].notna() & (frame[column].astype(str).str.strip() != "")
    if bad.any() and not allow_text:
        row = int(frame.index[bad][0])
        raise PrepareError(f"{path}: row {row + 2}: column '{column}' holds '{frame[column][row]}', not a number")
    return values
