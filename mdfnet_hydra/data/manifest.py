"""The prepared-dataset format: `<root>/manifest.parquet` plus the images it points to.

One row per sample (one image of one study). The synthetic generator and the MIMIC preparation both
write exactly this, and training reads nothing else:

| column | type | meaning |
| --- | --- | --- |
| sample_id | str | unique per row |
| patient_id | str | splits never share a patient |
| split | str | train / val / test |
| image_path | str | relative to the dataset root |
| text | str | clinical free text known before the read (indication, chief complaint) |
| age, temperature, heartrate, resprate, o2sat, sbp, dbp, pain, acuity | float | triage values, NaN if missing |
| sex | str | "M" / "F", null if missing |
| the 14 CheXpert label names | float | 1 positive, 0 negative, -1 uncertain, NaN not mentioned |
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mdfnet_hydra.labels import CHEXPERT_LABELS, CLINICAL_FEATURES

ID_COLUMNS = ("sample_id", "patient_id", "split", "image_path", "text")
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ID_COLUMNS + CLINICAL_FEATURES + CHEXPERT_LABELS
ALLOWED_LABEL_VALUES = (1.0, 0.0, -1.0)


class ManifestError(ValueError):
    """A prepared dataset that does not follow the documented format."""


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest; errors name the file, the column and the first bad rows."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"no manifest at {path}: data.root must be a prepared dataset directory holding "
            f"{path.name} (see README, 'Prepared-dataset format')"
        )
    frame = pd.read_parquet(path)
    validate_manifest(frame, source=str(path))
    return frame


def validate_manifest(frame: pd.DataFrame, source: str = "manifest") -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"{source}: missing columns {missing}")
    if frame["sample_id"].duplicated().any():
        dup = frame.loc[frame["sample_id"].duplicated(), "sample_id"].head(3).tolist()
        raise ManifestError(f"{source}: duplicate sample_id values, e.g. {dup}")
    bad_split = ~frame["split"].isin(SPLITS)
    if bad_split.any():
        rows = frame.index[bad_split][:3].tolist()
        raise ManifestError(f"{source}: split must be one of {SPLITS}; bad rows {rows}")
    per_patient = frame.groupby("patient_id")["split"].nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        raise ManifestError(
            f"{source}: {len(leaking)} patients appear in more than one split; splits must be by patient"
        )
    for label in CHEXPERT_LABELS:
        values = pd.to_numeric(frame[label], errors="coerce")
        bad = values.notna() & ~values.isin(ALLOWED_LABEL_VALUES)
        bad |= values.isna() & frame[label].notna()
        if bad.any():
            rows = frame.index[bad][:3].tolist()
            raise ManifestError(
                f"{source}: label column '{label}' holds values other than 1, 0, -1 or empty "
                f"at rows {rows}: {frame.loc[bad, label].head(3).tolist()}"
            )
    sex = frame["sex"].dropna()
    if not sex.isin(["M", "F"]).all():
        raise ManifestError(f"{source}: column 'sex' must be 'M', 'F' or empty")


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
