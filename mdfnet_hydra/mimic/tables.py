"""Finding and reading MIMIC's CSV tables (gzip or plain) with errors that name the file and row."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

MAX_LINES_NAMED = 5  # bad lines listed in an error; the count says how many more
SHOWN_REPEATS = 3  # repeated keys named in an error
NUMERIC_ID = re.compile(r"\d{1,18}")  # MIMIC's subject_id, study_id, stay_id
DICOM_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # MIMIC-CXR's '02aa804e-bde0afdd-112c0b34-7bc16630-4e384014'


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
    ambiguous = False
    for key, (option, root, stem, subdirs) in tables.items():
        tried = table_candidates(root, stem, subdirs)
        hits = [path for path in tried if path.is_file()]
        if not hits:
            missing.append(f"the {stem} table ({option}={root}; looked for {', '.join(map(str, tried))})")
        elif len(hits) > 1:  # an unpacked copy beside the download, perhaps of another release
            ambiguous = True
            missing.append(
                f"one {stem} table, not {len(hits)} ({option}: {', '.join(map(str, hits))}; remove all but one)"
            )
        else:
            found[key] = hits[0]
    for key, (option, path, what) in folders.items():
        if path.is_dir():
            found[key] = path
        else:
            missing.append(f"the folder {path} ({option}; it holds {what})")
    if missing:
        raise PrepareError(
            f"{len(missing)} input(s) {'missing or ambiguous' if ambiguous else 'missing'}: {'; '.join(missing)}. "
            "Point the mimic.* options at "
            "the release folders that hold them and rerun."
        )
    return found


def read_table(path: Path, required: Iterable[str], dtype: dict | None = None) -> pd.DataFrame:
    check_field_counts(path)
    try:
        frame = pd.read_csv(path, dtype=dtype, low_memory=False)
    except pd.errors.EmptyDataError as err:
        raise PrepareError(f"{path}: is empty (not even a header row); download it again.") from err
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


def datetime_column(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """A column as timestamps; blanks become NaT, anything else unreadable names its row (it would
    otherwise silently never link)."""
    values = pd.to_datetime(frame[column], errors="coerce", format="ISO8601")  # MIMIC: 2180-05-06 19:17:00
    bad = values.isna() & frame[column].notna() & (frame[column].astype(str).str.strip() != "")
    if bad.any():
        row = int(frame.index[bad][0])
        raise PrepareError(
            f"{path}: row {row + 2}: column '{column}' holds '{frame[column][row]}', not a date and time"
        )
    return values


def id_column(frame: pd.DataFrame, column: str, path: Path, pattern: re.Pattern = NUMERIC_ID) -> pd.Series:
    """An identifier checked before it is used: ids join the tables and name the folders and files
    read and written, so a blank, a '../' step or a separator would join nothing or reach outside
    the tree. Read the column as text (dtype=str); numeric ids come back as int64, others as text."""
    text = frame[column].fillna("").astype(str)
    bad = ~text.str.fullmatch(pattern.pattern)
    if bad.any():
        row = int(frame.index[bad][0])
        expected = "digits" if pattern is NUMERIC_ID else "letters, digits, '-' and '_'"
        raise PrepareError(
            f"{path}: row {row + 2}: column '{column}' holds {text[row]!r}; an id must be {expected} "
            f"({int(bad.sum())} such row(s))"
        )
    return text.astype("int64") if pattern is NUMERIC_ID else text


def unique_key(frame: pd.DataFrame, key: Sequence[str], path: Path, what: str) -> None:
    """One row per key (a study's labels, an image, a patient, a stay): a repeated key would count a
    study twice, or pick one of two conflicting rows without saying which."""
    key = list(key)
    repeated = frame.duplicated(key, keep=False)
    if not repeated.any():
        return
    groups = list(frame[repeated].groupby(key, sort=False))
    examples = "; ".join(_repeat(key, values, rows.index) for values, rows in groups[:SHOWN_REPEATS])
    more = f" and {len(groups) - SHOWN_REPEATS} more" if len(groups) > SHOWN_REPEATS else ""
    raise PrepareError(
        f"{path}: {len(groups)} {'/'.join(key)} value(s) appear in more than one row ({examples}{more}); "
        f"the table must hold one row per {what}: download it again."
    )


def _repeat(key: list[str], values: Any, index: pd.Index) -> str:
    """'rows 2, 9 (subject_id 10000032, study_id 50414267)': a repeated key and where it is."""
    values = values if isinstance(values, tuple) else (values,)
    rows = ", ".join(str(row + 2) for row in index[:MAX_LINES_NAMED])
    more = f" and {len(index) - MAX_LINES_NAMED} more" if len(index) > MAX_LINES_NAMED else ""
    return f"rows {rows}{more} ({', '.join(f'{column} {value}' for column, value in zip(key, values))})"
