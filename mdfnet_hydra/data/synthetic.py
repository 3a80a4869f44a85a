"""A deterministic synthetic stand-in for MIMIC-CXR + MIMIC-IV-ED, in the prepared-dataset format.

How it is fair to every modality: each finding j has a latent severity
    l_j = w_v v_j + w_t t_j + w_c c_j + w_e e_j
whose four parts are independent Gaussians (correlated across findings, partly shared by a patient's
studies). The image is rendered from v only, the indication text from t only, the triage vitals from
c only, and e is never observed. A finding is positive when l_j passes the threshold that gives it a
MIMIC-like prevalence; borderline cases are labelled uncertain (-1); negatives are either explicitly
negated (0) or not mentioned (blank). So every modality carries information the others lack, no
modality reveals a label, and only their fusion approaches the attainable AUROC.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
from PIL import Image

from mdfnet_hydra.data.manifest import write_manifest
from mdfnet_hydra.labels import CHEXPERT_LABELS, CLINICAL_FEATURES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
L = {name: i for i, name in enumerate(CHEXPERT_LABELS)}


@dataclass(frozen=True)
class Finding:
    name: str
    prevalence: float  # fraction labelled positive
    uncertain: float  # fraction labelled -1 (borderline severity)
    negated: float  # probability a negative is explicitly negated (0) rather than blank
    weights: tuple[float, float, float, float]  # vision, text, clinical, unobserved


# Prevalences and uncertain rates in the range MIMIC-CXR's chexpert labels show.
FINDINGS = (
    Finding("Enlarged Cardiomediastinum", 0.035, 0.04, 0.30, (0.75, 0.30, 0.30, 0.30)),
    Finding("Cardiomegaly", 0.20, 0.03, 0.50, (0.80, 0.30, 0.35, 0.24)),
    Finding("Lung Opacity", 0.22, 0.02, 0.30, (0.70, 0.35, 0.40, 0.27)),
    Finding("Lung Lesion", 0.03, 0.006, 0.20, (0.65, 0.50, 0.20, 0.27)),
    Finding("Edema", 0.12, 0.06, 0.50, (0.60, 0.45, 0.50, 0.24)),
    Finding("Consolidation", 0.05, 0.02, 0.60, (0.60, 0.45, 0.50, 0.24)),
    Finding("Pneumonia", 0.07, 0.08, 0.55, (0.50, 0.55, 0.55, 0.24)),
    Finding("Atelectasis", 0.20, 0.05, 0.30, (0.70, 0.35, 0.35, 0.30)),
    Finding("Pneumothorax", 0.045, 0.005, 0.75, (0.65, 0.45, 0.45, 0.24)),
    Finding("Pleural Effusion", 0.24, 0.025, 0.70, (0.75, 0.30, 0.45, 0.24)),
    Finding("Pleural Other", 0.012, 0.003, 0.15, (0.65, 0.30, 0.30, 0.36)),
    Finding("Fracture", 0.02, 0.003, 0.25, (0.55, 0.60, 0.40, 0.24)),
    Finding("Support Devices", 0.29, 0.002, 0.15, (0.70, 0.55, 0.35, 0.18)),
)
NO_FINDING_NEGATED = 0.7
TEXT_EVIDENCE = 1.5  # how strongly phrase probabilities follow the text part of each finding
SHARED_BY_PATIENT = 0.4  # share of each latent part common to a patient's studies

# Correlated groups of findings (cardiac, infective, trauma, ICU) -> label co-occurrence.
FACTORS = {
    "cardiac": {"Enlarged Cardiomediastinum": 0.5, "Cardiomegaly": 0.6, "Edema": 0.6, "Pleural Effusion": 0.5},
    "infective": {"Lung Opacity": 0.6, "Consolidation": 0.6, "Pneumonia": 0.7, "Atelectasis": 0.4},
    "trauma": {"Pneumothorax": 0.5, "Fracture": 0.6, "Pleural Other": 0.3},
    "icu": {"Support Devices": 0.6, "Edema": 0.3, "Pleural Effusion": 0.3, "Atelectasis": 0.4, "Lung Opacity": 0.3},
    "malignancy": {"Lung Lesion": 0.6, "Pleural Other": 0.4, "Pleural Effusion": 0.2},
}


def _correlation() -> np.ndarray:
    names = [f.name for f in FINDINGS]
    loadings = np.zeros((len(names), len(FACTORS)))
    for k, group in enumerate(FACTORS.values()):
        for name, value in group.items():
            loadings[names.index(name), k] = value
    shared = loadings @ loadings.T
    cov = shared + np.diag(np.clip(1.0 - np.diag(shared), 0.05, None))
    d = np.sqrt(np.diag(cov))
    return cov / np.outer(d, d)


# Indication phrases: probability sigmoid(bias + sum(coef * t[finding])). Text sees only t.
PHRASES = (
    ("fever", -2.2, {"Pneumonia": 1.4, "Consolidation": 0.8}),
    ("productive cough", -2.4, {"Pneumonia": 1.2, "Lung Opacity": 0.6}),
    ("cough", -1.6, {"Pneumonia": 0.7, "Lung Opacity": 0.5, "Atelectasis": 0.3}),
    ("shortness of breath", -1.5, {"Edema": 0.9, "Pleural Effusion": 0.6, "Pneumothorax": 0.4}),
    ("CHF exacerbation", -2.8, {"Edema": 1.4, "Cardiomegaly": 0.9}),
    ("bilateral leg swelling", -2.8, {"Edema": 1.0, "Cardiomegaly": 0.7}),
    ("hypertension", -1.6, {"Cardiomegaly": 0.8, "Enlarged Cardiomediastinum": 0.7}),
    ("chest pain", -1.8, {"Enlarged Cardiomediastinum": 0.9, "Pneumothorax": 0.6}),
    ("sudden pleuritic pain", -3.2, {"Pneumothorax": 1.6}),
    ("fall", -2.4, {"Fracture": 1.5, "Pneumothorax": 0.5}),
    ("motor vehicle collision", -3.2, {"Fracture": 1.4, "Pneumothorax": 0.8, "Pleural Other": 0.4}),
    ("rib pain", -3.0, {"Fracture": 1.6}),
    ("intubated", -2.6, {"Support Devices": 1.6}),
    ("line placement", -2.4, {"Support Devices": 1.4}),
    ("NG tube check", -3.0, {"Support Devices": 1.3}),
    ("history of lung cancer", -3.2, {"Lung Lesion": 1.6, "Pleural Other": 0.6}),
    ("weight loss", -2.8, {"Lung Lesion": 1.1}),
    ("hemoptysis", -3.4, {"Lung Lesion": 1.0, "Pneumonia": 0.5}),
    ("post-operative", -2.6, {"Atelectasis": 1.3, "Pleural Effusion": 0.5}),
    ("hypoxia", -2.2, {"Lung Opacity": 0.8, "Edema": 0.6, "Atelectasis": 0.5}),
    ("dyspnea on exertion", -2.4, {"Pleural Effusion": 1.0, "Cardiomegaly": 0.5}),
    # unrelated to any finding: text is never clean
    ("weakness", -1.8, {}),
    ("dizziness", -2.2, {}),
    ("abdominal pain", -2.2, {}),
    ("altered mental status", -2.5, {}),
    ("nausea", -2.3, {}),
)
QUESTIONS = (
    ("pneumonia", {"Pneumonia": 1.0, "Consolidation": 0.6}),
    ("effusion", {"Pleural Effusion": 1.0}),
    ("pneumothorax", {"Pneumothorax": 1.2}),
    ("fracture", {"Fracture": 1.2}),
    ("edema", {"Edema": 1.0}),
    ("line position", {"Support Devices": 1.0}),
    ("mass", {"Lung Lesion": 1.0}),
    ("cardiomegaly", {"Cardiomegaly": 0.9}),
)

# Triage features: baseline + scale * sum(coef * c[finding]) + noise. Clinical sees only c.
VITALS = {
    "temperature": (98.3, 1.1, 0.6, {"Pneumonia": 0.7, "Consolidation": 0.5, "Lung Opacity": 0.2}),
    "heartrate": (84.0, 10.0, 11.0, {"Pneumonia": 0.5, "Pneumothorax": 0.5, "Edema": 0.3, "Support Devices": 0.3}),
    "resprate": (18.0, 2.6, 2.2, {"Edema": 0.5, "Pneumothorax": 0.5, "Pleural Effusion": 0.4, "Pneumonia": 0.3}),
    "o2sat": (
        97.5,
        -2.2,
        1.3,
        {
            "Edema": 0.5,
            "Pneumothorax": 0.5,
            "Pleural Effusion": 0.4,
            "Consolidation": 0.4,
            "Lung Opacity": 0.3,
            "Atelectasis": 0.3,
        },
    ),
    "sbp": (134.0, 14.0, 17.0, {"Edema": 0.6, "Cardiomegaly": 0.4, "Enlarged Cardiomediastinum": 0.4}),
    "dbp": (77.0, 7.0, 10.0, {"Edema": 0.4, "Enlarged Cardiomediastinum": 0.3}),
    "pain": (3.0, 2.0, 2.3, {"Fracture": 0.8, "Pneumothorax": 0.5, "Pleural Other": 0.3}),
    "acuity": (2.9, -0.55, 0.55, {"Support Devices": 0.6, "Pneumothorax": 0.4, "Edema": 0.3, "Pneumonia": 0.3}),
    "age": (
        62.0,
        9.0,
        14.0,
        {
            "Cardiomegaly": 0.5,
            "Pleural Effusion": 0.4,
            "Lung Lesion": 0.5,
            "Enlarged Cardiomediastinum": 0.3,
            "Fracture": 0.3,
        },
    ),
}
MISSING_RATE = {
    "sex": 0.01,
    "temperature": 0.06,
    "heartrate": 0.04,
    "resprate": 0.05,
    "o2sat": 0.05,
    "sbp": 0.04,
    "dbp": 0.04,
    "pain": 0.12,
    "acuity": 0.02,
    "age": 0.0,
}
ENTRY_ERROR_RATE = 0.003  # e.g. temperature typed as 986


def synthetic_root_ready(root: Path) -> bool:
    return (root / "manifest.parquet").is_file()


def ensure_synthetic(root: str | Path, num_samples: int, image_size: int, seed: int) -> Path:
    """Generate the dataset into `root` unless it is there already.

    Built in a private temporary directory and renamed into place, so concurrent jobs of a sweep
    never see a half-written dataset: the first rename wins, the others discard their copy.
    """
    root = Path(root)
    if synthetic_root_ready(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating synthetic dataset (%d samples, %d px, seed %d) in %s", num_samples, image_size, seed, root)
    generate(tmp, num_samples=num_samples, image_size=image_size, seed=seed)
    try:
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not synthetic_root_ready(root):
            raise
    return root


def generate(root: Path, num_samples: int, image_size: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    patient_index = _assign_patients(rng, num_samples)
    n_patients = int(patient_index.max()) + 1
    parts = {m: _latent(rng, patient_index, n_patients) for m in ("vision", "text", "clinical", "unobserved")}
    weights = np.array([f.weights for f in FINDINGS], dtype=np.float64)
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    severity = sum(weights[:, k] * parts[m] for k, m in enumerate(("vision", "text", "clinical", "unobserved")))
    labels = _labels(rng, severity)

    frame = pd.DataFrame(
        {
            "sample_id": [f"syn-{i:06d}" for i in range(num_samples)],
            "patient_id": [f"synp-{p:05d}" for p in patient_index],
            "split": _split_by_patient(rng, patient_index, n_patients),
            "image_path": [f"images/syn-{i:06d}.png" for i in range(num_samples)],
            "text": _texts(rng, parts["text"], patient_index, n_patients),
        }
    )
    for name, values in _clinical(rng, parts["clinical"], patient_index, n_patients).items():
        frame[name] = values
    for j, name in enumerate(CHEXPERT_LABELS):
        frame[name] = labels[:, j]
    frame = frame.loc[:, list(frame.columns[:5]) + list(CLINICAL_FEATURES) + list(CHEXPERT_LABELS)]

    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(num_samples):
        pixels = _render(rng, parts["vision"][i], image_size)
        Image.fromarray(pixels, mode="L").save(root / frame.at[i, "image_path"], optimize=False)
    write_manifest(frame, root / "manifest.parquet")
    (root / "DATASET.md").write_text(
        f"Synthetic MDF-Net dataset, format v{FORMAT_VERSION}: {num_samples} samples, {n_patients} patients, "
        f"{image_size} px, seed {seed}. Generated by mdfnet_hydra.data.synthetic; not real patient data.\n"
    )
    return frame


def _assign_patients(rng: np.random.Generator, n: int) -> np.ndarray:
    counts = []
    while sum(counts) < n:
        counts.append(int(rng.choice([1, 2, 3, 4], p=[0.55, 0.25, 0.12, 0.08])))
    index = np.repeat(np.arange(len(counts)), counts)[:n]
    return index


def _latent(rng: np.random.Generator, patient_index: np.ndarray, n_patients: int) -> np.ndarray:
    chol = np.linalg.cholesky(_correlation())
    k = len(FINDINGS)
    per_patient = rng.standard_normal((n_patients, k)) @ chol.T
    per_study = rng.standard_normal((len(patient_index), k)) @ chol.T
    return np.sqrt(SHARED_BY_PATIENT) * per_patient[patient_index] + np.sqrt(1 - SHARED_BY_PATIENT) * per_study


def _labels(rng: np.random.Generator, severity: np.ndarray) -> np.ndarray:
    n = severity.shape[0]
    labels = np.full((n, len(CHEXPERT_LABELS)), np.nan, dtype=np.float32)
    positive_any = np.zeros(n, dtype=bool)
    for k, finding in enumerate(FINDINGS):
        j = L[finding.name]
        threshold = NormalDist().inv_cdf(1.0 - finding.prevalence)
        s = severity[:, k]
        distance = np.abs(s - threshold)
        n_uncertain = int(round(finding.uncertain * n))
        uncertain = np.zeros(n, dtype=bool)
        uncertain[np.argsort(distance)[:n_uncertain]] = True
        positive = (s > threshold) & ~uncertain
        negated = ~positive & ~uncertain & (rng.random(n) < finding.negated)
        labels[positive, j] = 1.0
        labels[uncertain, j] = -1.0
        labels[negated, j] = 0.0
        if finding.name != "Support Devices":
            positive_any |= positive | uncertain
    no_finding = L["No Finding"]
    labels[~positive_any, no_finding] = 1.0
    labels[positive_any & (rng.random(n) < NO_FINDING_NEGATED), no_finding] = 0.0
    return labels


def _split_by_patient(rng: np.random.Generator, patient_index: np.ndarray, n_patients: int) -> list[str]:
    draw = rng.random(n_patients)
    per_patient = np.where(draw < 0.7, "train", np.where(draw < 0.85, "val", "test"))
    return per_patient[patient_index].tolist()


def _score(t: np.ndarray, coefs: dict[str, float]) -> np.ndarray:
    names = [f.name for f in FINDINGS]
    out = np.zeros(t.shape[0])
    for name, coef in coefs.items():
        out += coef * t[:, names.index(name)]
    return out


def _texts(rng: np.random.Generator, t: np.ndarray, patient_index: np.ndarray, n_patients: int) -> list[str]:
    n = t.shape[0]
    sex = np.where(rng.random(n_patients) < 0.5, "M", "F")[patient_index]
    chosen = []
    for _phrase, bias, coefs in PHRASES:
        p = 1.0 / (1.0 + np.exp(-(bias + TEXT_EVIDENCE * _score(t, coefs))))
        chosen.append(rng.random(n) < p)
    question_scores = np.stack([_score(t, c) + rng.normal(0, 0.8, n) for _, c in QUESTIONS], axis=1)
    texts = []
    for i in range(n):
        complaints = [PHRASES[k][0] for k in range(len(PHRASES)) if chosen[k][i]]
        order = rng.permutation(len(complaints))
        complaints = [complaints[k] for k in order][:4]
        if not complaints:
            complaints = [str(rng.choice(["routine evaluation", "follow up", "pre-operative evaluation"]))]
        body = ", ".join(complaints[:-1]) + (" and " if len(complaints) > 1 else "") + complaints[-1]
        best = int(np.argmax(question_scores[i]))
        question = QUESTIONS[best][0] if question_scores[i, best] > 1.0 else "acute process"
        texts.append(f"INDICATION: ___ year old {sex[i]} with {body}. Evaluate for {question}.")
    return texts


def _clinical(rng: np.random.Generator, c: np.ndarray, patient_index: np.ndarray, n_patients: int) -> dict:
    n = c.shape[0]
    out: dict[str, np.ndarray] = {}
    for name, (base, scale, noise, coefs) in VITALS.items():
        out[name] = base + scale * _score(c, coefs) + rng.normal(0, noise, n)
    out["age"] = np.clip(out["age"], 18, 99).round()
    out["o2sat"] = np.clip(out["o2sat"], 70, 100).round()
    out["pain"] = np.clip(out["pain"], 0, 10).round()
    out["acuity"] = np.clip(out["acuity"], 1, 5).round()
    out["heartrate"] = out["heartrate"].round()
    out["resprate"] = np.clip(out["resprate"], 8, 50).round()
    out["sbp"] = out["sbp"].round()
    out["dbp"] = out["dbp"].round()
    out["temperature"] = out["temperature"].round(1)
    typo = rng.random(n) < ENTRY_ERROR_RATE
    out["temperature"][typo] *= 10  # data-entry errors the normaliser must treat as missing
    for name, rate in MISSING_RATE.items():
        if name != "sex":
            out[name][rng.random(n) < rate] = np.nan
    sex_prob = 0.5 + 0.08 * np.tanh(_score(c, {"Cardiomegaly": 0.5, "Pneumothorax": 0.5}))
    sex = np.where(rng.random(n) < sex_prob, "M", "F").astype(object)
    sex[rng.random(n) < MISSING_RATE["sex"]] = None
    result: dict[str, np.ndarray] = {name: out[name].astype(np.float64) for name in CLINICAL_FEATURES if name != "sex"}
    result["sex"] = sex
    return result


def _render(rng: np.random.Generator, v: np.ndarray, size: int) -> np.ndarray:
    """A frontal chest radiograph cartoon whose findings show with strength sigmoid(v)."""
    names = [f.name for f in FINDINGS]
    amp = {name: 1.0 / (1.0 + np.exp(-2.5 * (v[k] - 0.8))) for k, name in enumerate(names)}
    shift = rng.uniform(-0.06, 0.06, 2)
    yy, xx = np.mgrid[-1 : 1 : complex(size), -1 : 1 : complex(size)]
    xx, yy = xx + shift[0], yy + shift[1]

    def ellipse(cx, cy, rx, ry):
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0

    def blob(cx, cy, r):
        return np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))

    img = np.full((size, size), 0.55)
    lungs = ellipse(-0.42, -0.05, 0.33, 0.62) | ellipse(0.42, -0.05, 0.33, 0.62)
    img[lungs] = 0.22
    img += 0.04 * np.sin(yy * 18.0) * lungs  # ribs
    side = rng.choice([-1.0, 1.0])
    lung_x = 0.42 * side

    heart_r = 0.20 + 0.12 * amp["Cardiomegaly"]
    img[ellipse(0.12, 0.30, heart_r * 1.2, heart_r)] = 0.72
    mediastinum = (np.abs(xx) < 0.08 + 0.08 * amp["Enlarged Cardiomediastinum"]) & (yy < 0.2) & (yy > -0.95)
    img[mediastinum] = 0.70
    img += 0.35 * amp["Lung Opacity"] * blob(lung_x, rng.uniform(-0.4, 0.3), 0.18) * lungs
    img += 0.55 * amp["Lung Lesion"] * blob(lung_x + rng.uniform(-0.12, 0.12), rng.uniform(-0.45, 0.25), 0.08)
    img += 0.30 * amp["Edema"] * (blob(-0.25, 0.0, 0.2) + blob(0.25, 0.0, 0.2)) * lungs
    img += 0.45 * amp["Consolidation"] * blob(-lung_x, 0.35, 0.16) * lungs
    for _ in range(4):
        img += 0.25 * amp["Pneumonia"] * blob(lung_x + rng.uniform(-0.2, 0.2), rng.uniform(0.0, 0.45), 0.07) * lungs
    band = (np.abs(yy - 0.3) < 0.05) & (np.abs(xx + lung_x) < 0.3)
    img += 0.40 * amp["Atelectasis"] * band
    # pneumothorax: a lucent apex without lung markings, bounded by a thin bright pleural line
    ptx_side = -side
    apex_d = ((xx - 0.5 * ptx_side) / 0.28) ** 2 + ((yy + 0.45) / 0.3) ** 2
    img[(apex_d <= 1.0) & lungs] -= 0.2 * amp["Pneumothorax"]
    img += 0.45 * amp["Pneumothorax"] * ((np.abs(apex_d - 1.0) < 0.12) & lungs)
    fluid = lungs & (yy > 0.55 - 0.35 * amp["Pleural Effusion"] + 0.05 * np.abs(xx - lung_x))
    img[fluid] = img[fluid] * (1 - amp["Pleural Effusion"]) + 0.70 * amp["Pleural Effusion"]
    # pleural thickening along the lateral lung border
    lateral = np.abs(np.sqrt(((np.abs(xx) - 0.42) / 0.33) ** 2 + ((yy + 0.05) / 0.62) ** 2) - 0.95) < 0.06
    img += 0.45 * amp["Pleural Other"] * lateral * (np.abs(xx) > 0.5) * (yy > -0.3)
    rib = (np.abs((yy - 0.1) - 0.6 * (np.abs(xx) - 0.85)) < 0.035) & (np.abs(xx) > 0.76) & (np.abs(xx) < 0.97)
    img += 0.60 * amp["Fracture"] * rib
    # support device: a catheter over the right lung ending in a bright tip
    tip_y = -0.1 + 0.4 * rng.random()
    tube = (np.abs(xx - 0.22 - 0.15 * (yy + 1.0)) < 0.025) & (yy < tip_y)
    img += 0.55 * amp["Support Devices"] * (tube + 0.8 * blob(0.22 + 0.15 * (tip_y + 1.0), tip_y, 0.04))

    img = (img - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.06, 0.06)
    img += rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
