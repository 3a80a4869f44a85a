"""The prepared-dataset format: `<root>/manifest.parquet` plus the images it points to.

One row per sample (one image of one study). The synthetic generator and the MIMIC preparation both
write exactly this, and training reads nothing else:

| column | type | meaning |
| --- | --- | --- |
| sample_id | str | unique per row |
| patient_id | str | splits never share a patient |
| split | str | train / val / test |
| image_path | str | relative to the dataset root, without `..` (nothing outside the root is read) |
| text | str | clinical free text known before the read (indication, chief complaint); null = empty |
| age, temperature, heartrate, resprate, o2sat, sbp, dbp, pain, acuity | float | triage values, NaN if missing |
| sex | str | "M" / "F", null if missing |
| the 14 CheXpert label names | float | 1 positive, 0 negative, -1 uncertain, NaN not mentioned |
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from mdfnet_hydra.labels import CHEXPERT_LABELS, CLINICAL_FEATURES
from mdfnet_hydra.tracking import private

ID_COLUMNS = ("sample_id", "patient_id", "split", "image_path", "text")
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ID_COLUMNS + CLINICAL_FEATURES + CHEXPERT_LABELS
ALLOWED_LABEL_VALUES = (1.0, 0.0, -1.0)
SHOWN_ROWS = 3  # rows named in an error: enough to find the problem, short enough to read
SHOWN_PATIENTS = 3  # patient ids in the split-leak error (pseudonymous, but kept to a few)


class ManifestError(ValueError):
    """A prepared dataset that does not follow the documented format."""


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest; errors name the file, the column and the first bad rows."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"no manifest at {path}: data.root must be a prepared dataset directory holding "
            f"{path.name} (see docs/data.md, 'Prepared-dataset format')"
        )
    frame = pd.read_parquet(path)
    validate_manifest(frame, source=str(path))
    return with_numbers(with_empty_text(frame))


def with_empty_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Null `text` (a study without indication or chief complaint) becomes "" so that every
    consumer (tokenizer training, tokenising) sees strings; other non-strings are refused earlier."""
    text = frame["text"]
    if not text.isna().any():
        return frame
    if text.dtype.kind == "f":  # a column that is null throughout reads back as float NaN
        text = text.astype(object)
    return frame.assign(text=text.fillna(""))


def validate_manifest(frame: pd.DataFrame, source: str = "manifest") -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"{source}: missing columns {missing}")
    if frame["sample_id"].duplicated().any():
        dup = frame.loc[frame["sample_id"].duplicated(), "sample_id"].head(3).tolist()
        raise ManifestError(f"{source}: duplicate sample_id values, e.g. {private(str(dup))}")
    bad_split = ~frame["split"].isin(SPLITS)
    if bad_split.any():
        rows = frame.index[bad_split][:3].tolist()
        raise ManifestError(f"{source}: split must be one of {SPLITS}; bad rows {rows}")
    _check_patient_ids(frame, source)
    _check_patient_splits(frame, source)
    _check_image_paths(frame, source)
    _check_text(frame, source)
    _check_numeric(frame, source)
    for label in CHEXPERT_LABELS:
        column = frame[label]
        values = _label_values(column)
        bad = ~np.isnan(values) & ~np.isin(values, ALLOWED_LABEL_VALUES)  # (inf: not a number)
        if bad.any():
            raise ManifestError(
                f"{source}: label column '{label}' holds values other than 1, 0, -1 or empty "
                f"at rows {_rows(frame, bad)}: {private(str(frame.loc[bad, label].head(SHOWN_ROWS).tolist()))}"
            )
    sex = frame["sex"][~_empty(frame["sex"])]
    if not sex.isin(["M", "F"]).all():
        raise ManifestError(f"{source}: column 'sex' must be 'M', 'F' or empty")


NUMERIC_COLUMNS = tuple(c for c in CLINICAL_FEATURES if c != "sex")


def _empty(column: pd.Series) -> np.ndarray:
    """Null, NaN or a blank string: the documented 'missing' / 'not mentioned' of a manifest cell."""
    missing = column.isna().to_numpy(dtype=bool)
    if column.dtype.kind in "biufc":
        return missing
    return missing | _flags(column, lambda v: isinstance(v, str) and not v.strip())


def _label_values(column: pd.Series) -> np.ndarray:
    """A label column as float64: NaN for empty cells, inf for a cell that is not a number."""
    if column.dtype.kind in "iuf":
        return column.to_numpy(dtype=np.float64, na_value=np.nan)  # (nullable Int64 too)
    return np.array([np.inf if (n := _number(v)) is None else n for v in column], dtype=np.float64)


def _check_patient_ids(frame: pd.DataFrame, source: str) -> None:
    """Every row needs its patient: a null id would make its studies one pseudo-patient in the
    statistics and escape the 'no patient in two splits' check."""
    bad = _empty(frame["patient_id"])
    if bad.any():
        raise ManifestError(
            f"{source}: column 'patient_id' is null or empty at rows {_rows(frame, bad)}; every row needs "
            f"its patient's id (the split is by patient)"
        )


def _check_numeric(frame: pd.DataFrame, source: str) -> None:
    """A triage value that is not a number (a 'hot' in temperature) is a preparation bug, not a
    missing value: refused rather than silently read as missing. Empty cells stay missing."""
    for name in NUMERIC_COLUMNS:
        column = frame[name]
        if column.dtype.kind in "fiu":
            continue
        bad = ~_empty(column) & _flags(column, lambda v: _number(v) is None)
        if bad.any():
            raise ManifestError(
                f"{source}: column '{name}' must hold numbers (empty if missing) but holds "
                f"{private(str(column[bad].head(SHOWN_ROWS).tolist()))} at rows {_rows(frame, bad)}"
            )


def _number(value) -> float | None:
    """The cell as a float (NaN for an empty one), None if it is not a number."""
    if value is None or value is pd.NA or (isinstance(value, str) and not value.strip()):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def with_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric and label columns stored as text as float (blank cells read as missing), as the docs
    type them, once validated: every consumer then sees float NaN for missing. Columns already
    numeric keep their dtype (the synthetic data's float32 labels)."""
    columns = [c for c in NUMERIC_COLUMNS + CHEXPERT_LABELS if not _numeric_dtype(frame[c])]
    return frame.assign(**{c: np.fromiter(map(_number, frame[c]), dtype=np.float64, count=len(frame)) for c in columns})


def _numeric_dtype(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _rows(frame: pd.DataFrame, bad: pd.Series | np.ndarray) -> str:
    """The first bad rows (manifest row numbers) and how many there are, for an error message."""
    rows = frame.index[np.asarray(bad, dtype=bool)].tolist()
    more = f" ({len(rows)} in all)" if len(rows) > SHOWN_ROWS else ""
    return f"{rows[:SHOWN_ROWS]}{more}"


def _check_patient_splits(frame: pd.DataFrame, source: str) -> None:
    """A patient in two splits leaks their other studies into evaluation: name a few, with rows."""
    per_patient = frame.groupby("patient_id")["split"].nunique()
    leaking = per_patient.index[per_patient > 1]
    if not len(leaking):
        return
    examples = []
    for patient in leaking[:SHOWN_PATIENTS]:
        rows = frame[frame["patient_id"] == patient]
        where = ", ".join(
            f"{split} rows {_rows(rows, rows['split'] == split)}" for split in SPLITS if (rows["split"] == split).any()
        )
        examples.append(f"patient_id {patient!r} ({where})")
    raise ManifestError(
        f"{source}: {len(leaking)} patients appear in more than one split, e.g. {private('; '.join(examples))}; "
        f"splits must be by patient: give each patient's rows one split (prepare does this with split.seed)"
    )


def _flags(column: pd.Series, test) -> np.ndarray:
    """`test` of every value as a bool array (whatever the column's dtype)."""
    return np.fromiter((test(v) for v in column), dtype=bool, count=len(column))


_OUTSIDE = re.compile(r"^([\\/]|[A-Za-z]:)|(^|[\\/])\.\.([\\/]|$)")


def _check_image_paths(frame: pd.DataFrame, source: str) -> None:
    """Images are read from data.root only: an absolute path or a `..` step would read elsewhere."""
    paths = frame["image_path"]
    not_text = ~_flags(paths, lambda v: isinstance(v, str) and v != "")
    if not_text.any():
        raise ManifestError(
            f"{source}: column 'image_path' is empty or not a string at rows {_rows(frame, not_text)}: "
            f"{private(str(paths[not_text].head(SHOWN_ROWS).tolist()))}; give every row its image's path relative to data.root"
        )
    outside = _flags(paths, lambda v: bool(_OUTSIDE.search(v)))
    if outside.any():
        raise ManifestError(
            f"{source}: column 'image_path' holds absolute or '..' paths at rows {_rows(frame, outside)}: "
            f"{private(str(paths[outside].head(SHOWN_ROWS).tolist()))}; images are read from data.root only, so write "
            f"paths relative to it (copy or link the images under data.root)"
        )


def _check_text(frame: pd.DataFrame, source: str) -> None:
    """Text must be a string or null (read as empty); a number or a list is a preparation bug that
    would otherwise surface as a bare TypeError inside the tokenizer trainer."""
    text = frame["text"]
    bad = text.notna().to_numpy(dtype=bool) & ~_flags(text, lambda v: isinstance(v, str))
    if bad.any():
        raise ManifestError(
            f"{source}: column 'text' must hold strings (or null for no text) but holds "
            f"{sorted({type(v).__name__ for v in text[bad]})} at rows {_rows(frame, bad)}: "
            f"{private(str(text[bad].head(SHOWN_ROWS).tolist()))}; write the clinical text as a string column"
        )


def write_manifest(frame: pd.DataFrame, path: str | Path) -> None:
    """Validate, then write atomically so a concurrent reader never sees half a file."""
    validate_manifest(frame, source=str(path))
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    frame.loc[:, list(MANIFEST_COLUMNS) + [c for c in frame.columns if c not in MANIFEST_COLUMNS]].to_parquet(
        tmp, index=False
    )
    tmp.replace(path)


def label_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Raw label values (N, 14) as float32 with NaN for not mentioned."""
    return frame.loc[:, list(CHEXPERT_LABELS)].to_numpy(dtype=np.float32)
