"""Names shared by data, model and metrics: the 14 CheXpert labels and the ED triage features.

The label order is the order of MIMIC-CXR's chexpert CSV, so prepared manifests, logits and saved
predictions all index labels the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NUM_LABELS = len(CHEXPERT_LABELS)

# Raw label values as MIMIC-CXR writes them; blank (NaN) means "not mentioned".
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0

# MIMIC-IV-ED triage features used by MDF-Net, in manifest column order. `sex` is "M"/"F" in the
# manifest and 1/0 once encoded; the rest are numbers as triage records them (temperature in F).
CLINICAL_FEATURES: tuple[str, ...] = (
    "age",
    "sex",
    "temperature",
    "heartrate",
    "resprate",
    "o2sat",
    "sbp",
    "dbp",
    "pain",
    "acuity",
)

# Values outside these ranges are data-entry errors in triage records (a temperature of 986 F);
# they are treated as missing rather than allowed to dominate the normalisation statistics.
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "age": (0.0, 120.0),
    "sex": (0.0, 1.0),
    "temperature": (85.0, 110.0),
    "heartrate": (20.0, 250.0),
    "resprate": (4.0, 70.0),
    "o2sat": (50.0, 100.0),
    "sbp": (40.0, 300.0),
    "dbp": (20.0, 200.0),
    "pain": (0.0, 10.0),
    "acuity": (1.0, 5.0),
}


def implausible(name: str, values: np.ndarray | pd.Series) -> np.ndarray | pd.Series:
    """Where a feature's values lie outside PLAUSIBLE_RANGES (NaN is missing, not implausible); numpy
    arrays and pandas Series alike. Training turns these into missing values, and the preparation
    report counts them as missing."""
    low, high = PLAUSIBLE_RANGES[name]
    return (values < low) | (values > high)


def tag_name(label: str) -> str:
    """A label as a TensorBoard / file-name friendly token ("Pleural Effusion" -> "Pleural_Effusion")."""
    return label.replace(" ", "_")
