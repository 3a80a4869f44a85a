"""Triage-feature preprocessing fitted on the training split only and saved with each checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from mdfnet_hydra.labels import CLINICAL_FEATURES, implausible

log = logging.getLogger(__name__)


def raw_clinical(frame: pd.DataFrame) -> np.ndarray:
    """(N, 10) float64: sex encoded M=1 / F=0, implausible values (typos) turned into NaN."""
    columns = []
    for name in CLINICAL_FEATURES:
        if name == "sex":
            values = frame["sex"].map({"M": 1.0, "F": 0.0}).astype(np.float64).to_numpy()
        else:
            values = pd.to_numeric(frame[name], errors="coerce").astype(np.float64).to_numpy()
        values = np.where(implausible(name, values), np.nan, values)
        columns.append(values)
    return np.stack(columns, axis=1)


@dataclass
class ClinicalNormalizer:
    """Median imputation + standardisation, plus one missing-value indicator per feature.

    Output width is 2 x 10: the model sees both the (imputed, standardised) value and whether it
    was recorded, since in ED triage a missing vital is itself informative.

    A feature missing in every training row (`unrecorded`) has no statistics to scale with: it is
    treated as missing in every split (value 0, indicator 1), exactly what the model saw in
    training, instead of letting validation values in unscaled. The width stays 20 either way, so
    a model and its checkpointed preprocessing always agree.
    """

    median: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    unrecorded: Optional[np.ndarray] = None  # bool per feature; None (older checkpoints): none

    @property
    def out_dim(self) -> int:
        return 2 * len(CLINICAL_FEATURES)

    @classmethod
    def fit(cls, train: pd.DataFrame) -> "ClinicalNormalizer":
        raw = raw_clinical(train)
        unrecorded = np.isnan(raw).all(axis=0)
        for name in np.asarray(CLINICAL_FEATURES)[unrecorded]:
            log.warning(
                "triage feature '%s' is missing (or implausible) in all %d training rows: it is treated "
                "as missing in every split (value 0, missing indicator 1); check column '%s' of the "
                "manifest",
                name,
                len(raw),
                name,
            )
        median = np.zeros(raw.shape[1])
        median[~unrecorded] = np.nanmedian(raw[:, ~unrecorded], axis=0)
        imputed = np.where(np.isnan(raw), median, raw)
        mean = imputed.mean(axis=0) if len(raw) else np.zeros(raw.shape[1])
        std = imputed.std(axis=0) if len(raw) else np.ones(raw.shape[1])
        return cls(median=median, mean=mean, std=np.where(std < 1e-6, 1.0, std), unrecorded=unrecorded)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        raw = raw_clinical(frame)
        missing = np.isnan(raw)
        if self.unrecorded is not None:
            missing |= self.unrecorded  # never recorded in training: missing everywhere
        imputed = np.where(missing, self.median, raw)
        scaled = (imputed - self.mean) / self.std
        return np.concatenate([scaled, missing.astype(np.float64)], axis=1).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: torch.from_numpy(np.asarray(getattr(self, k), dtype=np.float64)) for k in ("median", "mean", "std")}
        if self.unrecorded is not None:
            state["unrecorded"] = torch.from_numpy(np.asarray(self.unrecorded, dtype=bool))
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "ClinicalNormalizer":
        """Restore; checkpoints written before `unrecorded` existed keep their old behaviour."""
        unrecorded = state.get("unrecorded")
        return cls(
            **{k: state[k].numpy() for k in ("median", "mean", "std")},
            unrecorded=unrecorded.numpy().astype(bool) if unrecorded is not None else None,
        )
