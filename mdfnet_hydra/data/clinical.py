"""Triage-feature preprocessing fitted on the training split only and saved with each checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mdfnet_hydra.labels import CLINICAL_FEATURES, PLAUSIBLE_RANGES


def raw_clinical(frame: pd.DataFrame) -> np.ndarray:
    """(N, 10) float64: sex encoded M=1 / F=0, implausible values (typos) turned into NaN."""
    columns = []
    for name in CLINICAL_FEATURES:
        if name == "sex":
            values = frame["sex"].map({"M": 1.0, "F": 0.0}).astype(np.float64).to_numpy()
        else:
            values = pd.to_numeric(frame[name], errors="coerce").astype(np.float64).to_numpy()
        low, high = PLAUSIBLE_RANGES[name]
        values = np.where((values < low) | (values > high), np.nan, values)
        columns.append(values)
    return np.stack(columns, axis=1)


@dataclass
class ClinicalNormalizer:
    """Median imputation + standardisation, plus one missing-value indicator per feature.

    Output width is 2 x 10: the model sees both the (imputed, standardised) value and whether it
    was recorded, since in ED triage a missing vital is itself informative.
    """

    median: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @property
    def out_dim(self) -> int:
        return 2 * len(CLINICAL_FEATURES)

    @classmethod
    def fit(cls, train: pd.DataFrame) -> "ClinicalNormalizer":
        raw = raw_clinical(train)
        median = np.nanmedian(raw, axis=0)
        median = np.where(np.isnan(median), 0.0, median)  # a feature never recorded in training
        imputed = np.where(np.isnan(raw), median, raw)
        mean = imputed.mean(axis=0)
        std = imputed.std(axis=0)
        return cls(median=median, mean=mean, std=np.where(std < 1e-6, 1.0, std))

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        raw = raw_clinical(frame)
        missing = np.isnan(raw)
        imputed = np.where(missing, self.median, raw)
        scaled = (imputed - self.mean) / self.std
        return np.concatenate([scaled, missing.astype(np.float64)], axis=1).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(getattr(self, k), dtype=np.float64)) for k in ("median", "mean", "std")}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "ClinicalNormalizer":
        return cls(**{k: state[k].numpy() for k in ("median", "mean", "std")})
