"""A small fake MIMIC tree with the real file names, columns and quirks, built by the tests.

MIMIC-CXR-JPG 2.0.0: mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz and
files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg; MIMIC-CXR reports: files/pXX/pXXXXXXXX/sXXXXXXXX.txt;
MIMIC-IV-ED: ed/edstays.csv.gz, ed/triage.csv.gz; MIMIC-IV: hosp/patients.csv.gz.

Quirks covered: gzip CSVs (and one plain CSV), several images per study, lateral views, uncertain
and blank labels, a study outside any ED stay, a study inside one only with the slack, reports with
and without an INDICATION section, a free-text pain score, a missing image, a patient absent from
patients.csv. LEAKY_REPORTS / ALLOWED_REPORTS: report layouts whose findings must never reach the
input text, and layouts whose before-the-read text must.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# The chexpert CSV's own column order (alphabetical), not ours.
CSV_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]

REPORT_WITH_INDICATION = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is a small left pleural effusion. No pneumothorax.

 IMPRESSION:

 Small left effusion.
"""

REPORT_WITH_HISTORY = """                                 FINAL REPORT
 HISTORY:  Shortness of breath, history of CHF.

 FINDINGS:  Moderate cardiomegaly with mild pulmonary edema.

 IMPRESSION:  Cardiomegaly and mild edema.
"""

REPORT_WITHOUT_INDICATION = """                                 FINAL REPORT
 FINDINGS:  The lungs are clear. No effusion.

 IMPRESSION:  No acute cardiopulmonary process.
"""

# Layouts in which the read (every "effusion" below) sits next to the allowed sections: none of it may
# reach the input text. Each keeps an INDICATION that must survive as "cough".
LEAKY_REPORTS = {
    "combined header": " INDICATION:  cough\n\n FINDINGS/IMPRESSION:  Small left effusion.\n",
    "findings and impression": " INDICATION:  cough\n FINDINGS AND IMPRESSION:  Small left effusion.\n",
    "numbered header": " INDICATION:  cough\n\n FINDINGS 2:  Small left effusion.\n\n IMPRESSION 1:  Effusion.\n",
    "header mid-line": " INDICATION:  cough  FINDINGS:  Small left effusion.\n",
    "header after a sentence": " INDICATION:  cough. Impression: small left effusion.\n",
    "header after words": " INDICATION:  cough findings: small left effusion.\n",
    "no header after a blank line": " INDICATION:  cough\n\n There is a small left effusion.\n",
    "no header on the next line": " INDICATION:  cough.\n There is a small left effusion.\n",
    "unknown header": " INDICATION:  cough\n PA AND LATERAL VIEWS:  Small left effusion.\n",
    "wet read after the indication": " INDICATION:  cough\n WET READ:  ___ 10:30 PM  small left effusion\n",
    "history inside the findings": " INDICATION:  cough\n\n FINDINGS:  Small left effusion, given history: CHF, effusion.\n",
    "lower-case allowed header inside the findings": " INDICATION:  cough\n FINDINGS:\n history: small left effusion.\n",
    "findings on the line after an indication without a full stop": " INDICATION:  cough\n Single portable view of the chest. There is a new small left effusion.\n",
    "a findings line that reads like a header": " INDICATION:  cough\n AP portable chest radiograph: small left effusion.\n",
}

# Layouts that must keep their before-the-read text.
ALLOWED_REPORTS = {
    "wrapped indication": (
        " INDICATION:  ___M with a long history of congestive heart failure, now with\n"
        " worsening dyspnea  // eval for edema\n\n FINDINGS:  Small left effusion.\n",
        {
            "indication": "___M with a long history of congestive heart failure, now with worsening "
            "dyspnea // eval for edema"
        },
    ),
    "indication below its header": (" INDICATION:\n\n cough\n\n IMPRESSION:  Effusion.\n", {"indication": "cough"}),
    "wet read first": (
        " WET READ: ___ ___ 10:30 PM  small left effusion\n\n FINAL REPORT\n CLINICAL INFORMATION:  "
        "fever\n\n REASON FOR EXAMINATION:  eval pna\n\n FINDINGS:  Effusion.\n",
        {"history": "fever", "reason_for_exam": "eval pna"},
    ),
    "indication then comparison": (
        " INDICATION:  cough  // pna?\n\n COMPARISON:  ___.\n\n FINDINGS:  Effusion.\n",
        {"indication": "cough // pna?", "comparison": "___."},
    ),
    "title-case words with colons inside the indication": (
        " INDICATION:  History: ___F with CHF. PMH: COPD. Question: pna?\n\n FINDINGS:  Effusion.\n",
        {"indication": "History: ___F with CHF. PMH: COPD. Question: pna?"},
    ),
}


@dataclass
class Study:
    subject: int
    study: int
    split: str
    date: int  # YYYYMMDD
    time: float  # HHMMSS.fff
    images: list[tuple[str, str]]  # (dicom_id, ViewPosition)
    labels: dict[str, float] = field(default_factory=dict)
    report: str | None = REPORT_WITH_INDICATION


STUDIES = [
    # patient 10000032: two studies, the first with PA + lateral, inside ED stay 30000001
    Study(
        10000032,
        50414267,
        "train",
        21800506,
        213014.531,
        [("d-pa-1", "PA"), ("d-lat-1", "LATERAL")],
        {"Pleural Effusion": 1.0, "Pneumothorax": 0.0, "Edema": -1.0},
    ),
    Study(
        10000032,
        53189527,
        "train",
        21800626,
        165500.312,
        [("d-ap-2", "AP")],
        {"No Finding": 1.0},
        REPORT_WITHOUT_INDICATION,
    ),
    # patient 10000764: AP and PA of one study (PA preferred), outside any ED stay
    Study(
        10000764,
        57375967,
        "validate",
        21320731,
        90203.0,
        [("d-ap-3", "AP"), ("d-pa-3", "PA")],
        {"Cardiomegaly": 1.0, "Edema": 1.0},
        REPORT_WITH_HISTORY,
    ),
    # patient 10000898: study 4 hours after the ED stay ended (linked only with slack >= 4 h)
    Study(10000898, 50771383, "test", 21220712, 30000.0, [("d-pa-4", "PA")], {"Fracture": 1.0, "Pneumonia": -1.0}),
    # patient 10001122: lateral only (dropped by the view filter), and a study whose image is missing
    Study(10001122, 51245362, "train", 21400102, 120000.0, [("d-lat-5", "LATERAL")], {"Atelectasis": 1.0}),
    Study(10001122, 58937611, "train", 21400301, 80000.0, [("d-missing-6", "PA")], {"Atelectasis": 0.0}),
    # patient 10001401: not in patients.csv, no report file
    Study(10001401, 55555555, "train", 21500101, 100000.0, [("d-pa-7", "PA")], {"Support Devices": 1.0}, None),
]
MISSING_IMAGES = {"d-missing-6"}

ED_STAYS = [
    # subject_id, hadm_id, stay_id, intime, outtime, gender
    (10000032, 22595853, 30000001, "2180-05-06 19:17:00", "2180-05-06 23:30:00", "F"),
    (10000032, None, 30000002, "2180-07-23 05:54:00", "2180-07-23 14:00:00", "F"),
    (10000898, None, 30000003, "2122-07-11 18:00:00", "2122-07-11 23:00:00", "F"),
    (10001122, 22222222, 30000004, "2140-03-01 06:00:00", "2140-03-01 10:00:00", "M"),
    (10001401, None, 30000005, "2150-01-01 08:00:00", "2150-01-01 12:00:00", "M"),
]
TRIAGE = [
    # stay_id, temperature, heartrate, resprate, o2sat, sbp, dbp, pain, acuity, chiefcomplaint
    (30000001, 98.4, 88.0, 18.0, 97.0, 120.0, 80.0, "5", 2.0, "Abd pain, Abdominal distention"),
    (30000002, 99.1, 95.0, 20.0, 94.0, 135.0, 70.0, "unable", 3.0, "Dyspnea"),
    (30000003, None, 110.0, 22.0, 91.0, 150.0, 95.0, "8", 1.0, "s/p Fall"),
    (30000004, 101.2, 120.0, 28.0, 89.0, 100.0, 60.0, "0", 2.0, "Fever"),
    (30000005, 986.0, 70.0, 16.0, 99.0, 128.0, 76.0, "2", 4.0, "Line check"),
]
PATIENTS = [
    # subject_id, gender, anchor_age, anchor_year
    (10000032, "F", 52, 2180),
    (10000764, "M", 86, 2132),
    (10000898, "F", 70, 2120),
    (10001122, "M", 40, 2141),
]


def study_dir(base: Path, subject: int, study: int) -> Path:
    return base / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"


def build(root: Path, studies: list[Study] = STUDIES) -> dict[str, Path]:
    """Write the tree under root; return the four roots the preparation takes."""
    cxr, reports, ed, hosp = root / "mimic-cxr-jpg", root / "mimic-cxr", root / "mimic-iv-ed", root / "mimic-iv"
    rng = np.random.default_rng(0)
    meta, labels, split = [], [], []
    for s in studies:
        for dicom, view in s.images:
            meta.append(
                {
                    "dicom_id": dicom,
                    "subject_id": s.subject,
                    "study_id": s.study,
                    "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                    "ViewPosition": view,
                    "Rows": 3056,
                    "Columns": 2544,
                    "StudyDate": s.date,
                    "StudyTime": s.time,
                    "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                    "ViewCodeSequence_CodeMeaning": "postero-anterior",
                    "PatientOrientationCodeSequence_CodeMeaning": "Erect",
                }
            )
            split.append({"dicom_id": dicom, "study_id": s.study, "subject_id": s.subject, "split": s.split})
            if dicom not in MISSING_IMAGES:
                path = study_dir(cxr, s.subject, s.study) / f"{dicom}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = (rng.random((300, 250)) * 255).astype(np.uint8)  # portrait, like a radiograph
                Image.fromarray(pixels, mode="L").save(path, quality=90)
        labels.append(
            {"subject_id": s.subject, "study_id": s.study, **{name: s.labels.get(name, np.nan) for name in CSV_LABELS}}
        )
        if s.report is not None:
            path = study_dir(reports, s.subject, s.study).with_suffix(".txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(s.report)
    cxr.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(meta).to_csv(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    pd.DataFrame(labels).to_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    pd.DataFrame(split).to_csv(cxr / "mimic-cxr-2.0.0-split.csv", index=False)  # a plain CSV too
    (ed / "ed").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(ED_STAYS, columns=["subject_id", "hadm_id", "stay_id", "intime", "outtime", "gender"]).assign(
        race="UNKNOWN", arrival_transport="WALK IN", disposition="HOME"
    ).to_csv(ed / "ed" / "edstays.csv.gz", index=False)
    pd.DataFrame(
        TRIAGE,
        columns=[
            "stay_id",
            "temperature",
            "heartrate",
            "resprate",
            "o2sat",
            "sbp",
            "dbp",
            "pain",
            "acuity",
            "chiefcomplaint",
        ],
    ).merge(
        pd.DataFrame(ED_STAYS, columns=["subject_id", "hadm_id", "stay_id", "intime", "outtime", "gender"])[
            ["subject_id", "stay_id"]
        ]
    )[
        [
            "subject_id",
            "stay_id",
            "temperature",
            "heartrate",
            "resprate",
            "o2sat",
            "sbp",
            "dbp",
            "pain",
            "acuity",
            "chiefcomplaint",
        ]
    ].to_csv(ed / "ed" / "triage.csv.gz", index=False)
    (hosp / "hosp").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(PATIENTS, columns=["subject_id", "gender", "anchor_age", "anchor_year"]).assign(
        anchor_year_group="2008 - 2010", dod=None
    ).to_csv(hosp / "hosp" / "patients.csv.gz", index=False)
    return {"cxr_jpg": cxr, "reports": reports, "ed": ed, "hosp": hosp}


def many_studies(patients: int, first_subject: int = 11000000) -> list[Study]:
    """One PA study per patient, all in the official train split (for the random split, image workers
    and other tests that need more than a handful of patients; they have no ED stay or patients row)."""
    return [
        Study(first_subject + i, 56000000 + i, "train", 21800101, 120000.0, [(f"d-many-{i}", "PA")], {"Edema": 1.0})
        for i in range(patients)
    ]
