"""Prepared-dataset format, label policies, clinical preprocessing and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mdfnet_hydra.config import BlankPolicy, UncertainPolicy
from mdfnet_hydra.data.clinical import ClinicalNormalizer
from mdfnet_hydra.data.manifest import ManifestError, read_manifest, validate_manifest
from mdfnet_hydra.data.synthetic import ensure_synthetic, generate
from mdfnet_hydra.data.targets import encode_targets
from mdfnet_hydra.labels import CHEXPERT_LABELS, CLINICAL_FEATURES


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "data"
    ensure_synthetic(root, num_samples=1200, image_size=32, seed=3)
    return root, read_manifest(root / "manifest.parquet")


def test_label_policies():
    raw = np.array([[1.0, 0.0, -1.0, np.nan]], dtype=np.float32)
    t, m = encode_targets(raw, UncertainPolicy.ignore, BlankPolicy.mask)
    assert t.tolist() == [[1, 0, 0, 0]] and m.tolist() == [[1, 1, 0, 0]]
    t, m = encode_targets(raw, UncertainPolicy.ones, BlankPolicy.zeros)
    assert t.tolist() == [[1, 0, 1, 0]] and m.tolist() == [[1, 1, 1, 1]]
    t, m = encode_targets(raw, "zeros", "mask")
    assert t.tolist() == [[1, 0, 0, 0]] and m.tolist() == [[1, 1, 1, 0]]


def test_synthetic_is_deterministic_and_valid(tmp_path, synthetic):
    _, frame = synthetic
    again = generate(tmp_path / "again", num_samples=1200, image_size=32, seed=3)
    pd.testing.assert_frame_equal(frame, again)
    assert (tmp_path / "again" / frame.image_path[0]).read_bytes() == (synthetic[0] / frame.image_path[0]).read_bytes()
    other = generate(tmp_path / "other", num_samples=1200, image_size=32, seed=4)
    assert not frame[list(CHEXPERT_LABELS)].equals(other[list(CHEXPERT_LABELS)])


def test_synthetic_looks_like_mimic(synthetic):
    _, frame = synthetic
    assert set(frame.split) == {"train", "val", "test"}
    assert frame.groupby("patient_id").split.nunique().max() == 1, "split by patient"
    assert frame.patient_id.nunique() < len(frame), "patients have several studies"
    positive = (frame[list(CHEXPERT_LABELS)] == 1).mean()
    assert 0.15 < positive["Pleural Effusion"] < 0.35 and 0.15 < positive["Cardiomegaly"] < 0.3
    assert positive["Pleural Other"] < 0.03 and positive["Fracture"] < 0.04, "rare labels stay rare"
    assert (frame[list(CHEXPERT_LABELS)] == -1).sum().sum() > 0, "uncertain labels present"
    assert frame[list(CHEXPERT_LABELS)].isna().sum().sum() > 0, "not-mentioned labels present"
    corr = frame[["Edema", "Cardiomegaly", "Fracture"]].replace(-1, np.nan).fillna(0).corr()
    assert corr.loc["Edema", "Cardiomegaly"] > corr.loc["Edema", "Fracture"], "co-occurrence structure"
    assert frame[list(CLINICAL_FEATURES)].drop(columns="sex").isna().mean().max() > 0.05, "missing vitals"
    assert frame.text.str.startswith("INDICATION:").all()
    febrile = frame.temperature > 100.0
    assert (frame.loc[febrile, "Pneumonia"] == 1).mean() > (frame.loc[~febrile, "Pneumonia"] == 1).mean(), (
        "vitals shift with labels"
    )


def test_manifest_validation_names_the_problem(synthetic):
    _, frame = synthetic
    bad = frame.copy()
    bad.loc[3, "Edema"] = 2.0
    with pytest.raises(ManifestError, match="'Edema'.*rows \\[3\\]"):
        validate_manifest(bad)
    counts = frame.patient_id.value_counts()
    rows = frame.index[frame.patient_id == counts[counts > 1].index[0]]
    leak = frame.copy()
    leak.loc[rows[0], "split"] = "test" if leak.loc[rows[1], "split"] != "test" else "train"
    with pytest.raises(ManifestError, match="more than one split"):
        validate_manifest(leak)
    with pytest.raises(ManifestError, match="missing columns"):
        validate_manifest(frame.drop(columns=["acuity"]))


def test_clinical_normaliser_uses_training_statistics_only(synthetic):
    _, frame = synthetic
    train, val = frame[frame.split == "train"], frame[frame.split == "val"]
    norm = ClinicalNormalizer.fit(train)
    shifted_val = val.assign(heartrate=val.heartrate + 50)
    assert np.array_equal(ClinicalNormalizer.fit(train).mean, norm.mean)
    x = norm.transform(shifted_val)
    assert x.shape == (len(val), 2 * len(CLINICAL_FEATURES))
    hr = CLINICAL_FEATURES.index("heartrate")
    assert x[:, hr][~np.isnan(val.heartrate.to_numpy())].mean() > 2.0, "val shift is visible, not re-normalised away"
    xt = norm.transform(train)
    assert abs(xt[:, hr].mean()) < 1e-5
    restored = ClinicalNormalizer.from_state_dict(norm.state_dict())
    assert np.array_equal(restored.transform(val), norm.transform(val))


def test_implausible_values_become_missing_with_indicator(synthetic):
    _, frame = synthetic
    train = frame[frame.split == "train"].copy().reset_index(drop=True)
    norm = ClinicalNormalizer.fit(train)
    probe = train.iloc[:2].copy()
    probe.loc[0, "temperature"] = 986.0
    probe.loc[1, "temperature"] = np.nan
    x = norm.transform(probe)
    t = CLINICAL_FEATURES.index("temperature")
    n = len(CLINICAL_FEATURES)
    assert x[0, n + t] == 1.0 and x[1, n + t] == 1.0
    assert x[0, t] == pytest.approx(x[1, t]), "both imputed with the training median"
