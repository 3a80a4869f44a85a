"""Finding and reading MIMIC's CSV tables (gzip or plain) with errors that name the file and row."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

MAX_LINES_NAMED = 5  # bad lines listed in an error; the count says how many more


class PrepareError(ValueError):
    """Input the preparation cannot use; the message names the file (and row) to fix."""


def table_candidates(root: str | Path, stem: str, subdirs: Sequence[str] = ("",)) -> list[Path]:
    root = Path(root).expanduser()
    return [root / sub / f"{stem}{suffix}" for sub in subdirs for suffix in (".csv.gz", ".csv")]


def find_table(root: str | Path, stem: str, subdirs: Sequence[str] = ("",)) -> Path:
    """`<root>[/<subdir>]/<stem>.csv.gz` or `.csv`, whichever exists."""
    tried = table_candidates(root, stem, subdirs)
    for path in tried:
        if path.is_file():
            return path
    raise PrepareError(f"cannot find the {stem} table; looked for: {', '.join(map(str, tried))}")


def locate_inputs(
    tables: Mapping[str, tuple[str, Path, str, Sequence[str]]], folders: Mapping[str, tuple[str, Path, str]]
) -> dict[str, Path]:
    """Every table and folder the preparation reads, found before any is read, so one run names
    every wrong path at once instead of failing on them one by one after minutes of reading.

    tables: key -> (option, root, stem, subdirs); folders: key -> (option, path, what it holds).
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, (option, root, stem, subdirs) in tables.items():
        tried = table_candidates(root, stem, subdirs)
        hit = next((path for path in tried if path.is_file()), None)
        if hit is None:
            missing.append(f"the {stem} table ({option}={root}; looked for {', '.join(map(str, tried))})")
        else:
            found[key] = hit
    for key, (option, path, what) in folders.items():
        if path.is_dir():
            found[key] = path
        else:
            missing.append(f"the folder {path} ({option}; it holds {what})")
    if missing:
        raise PrepareError(
            f"{len(missing)} input(s) missing: {'; '.join(missing)}. Point the mimic.* options at "
            "the release folders that hold them and rerun."
        )
    return found


def read_table(path: Path, required: Iterable[str], dtype: dict | None = None) -> pd.DataFrame:
    check_field_counts(path)
    try:
        frame = pd.read_csv(path, dtype=dtype, low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as err:
        raise PrepareError(f"{path}: cannot be read as CSV ({type(err).__name__}: {err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise PrepareError(f"{path}: missing columns {missing}; found {list(frame.columns)}")
    return frame


def check_field_counts(path: Path) -> None:
    """Every row has as many fields as the header. pandas fills a short row (a file cut mid-row
    inside a valid gzip, say) with blanks, which for the label table reads as "not mentioned"."""
    bad: list[tuple[int, int]] = []
    width = 0
    try:
        with _open_text(path) as handle:
            reader = csv.reader(handle)
            width = len(next(reader, []))
            for fields in reader:
                if fields and len(fields) != width:
                    bad.append((reader.line_num, len(fields)))
    except (UnicodeDecodeError, EOFError, OSError, csv.Error) as err:
        raise PrepareError(f"{path}: cannot be read as CSV ({type(err).__name__}: {err}); download it again.") from err
    if bad:
        named = ", ".join(f"line {line} has {count}" for line, count in bad[:MAX_LINES_NAMED])
        more = f" and {len(bad) - MAX_LINES_NAMED} more" if len(bad) > MAX_LINES_NAMED else ""
        raise PrepareError(
            f"{path}: {len(bad)} row(s) do not have the header's {width} fields ({named}{more}); "
            "the file is damaged or cut short: download it again."
        )


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def numeric_column(frame: pd.DataFrame, column: str, path: Path, allow_text: bool = False) -> pd.Series:
    """A column as floats. Free text (e.g. a pain score of "unable") becomes NaN when allowed;
    otherwise the first offending row is named."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() & frame[column].notna() & (frame[column].astype(str).str.strip() != "")
    if bad.any() and not allow_text:
        row = int(frame.index[bad][0])
        raise PrepareError(f"{path}: row {row + 2}: column '{column}' holds '{frame[column][row]}', not a number")
    return values
