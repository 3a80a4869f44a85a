"""MIMIC-CXR-JPG + reports + MIMIC-IV-ED + MIMIC-IV patients -> manifest.parquet + images/.

Every join and filter step is counted in the report (prepare_report.json / .md in the output
directory). Studies whose image is missing or unreadable are listed there, never silently lost.
Finished images made with the same settings are reused, so a re-run after an interruption only does
what is left.

Wrong input never yields a dataset: every input table and folder is located before any is read (one
error names all that are missing), rows with the wrong number of fields stop the run, every table's
ids, keys and values are checked as it is read (before any report or image is touched: an id names
the files read and written), a dataset without train or val studies is refused, and a source that
yields fewer than `checks.*` of what it must hold (reports, images, patients, ED stays, label rows,
split rows, triage rows) stops it with the path and what was expected there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from mdfnet_hydra.config import MIN_IMAGE_SIZE, outside_ranges
from mdfnet_hydra.data.manifest import SPLITS, write_manifest
from mdfnet_hydra.files import remove_stale_temporaries, write_text
from mdfnet_hydra.labels import CHEXPERT_LABELS, CLINICAL_FEATURES, implausible
from mdfnet_hydra.mimic.images import STATUSES, resize_all
from mdfnet_hydra.mimic.reports import KNOWN_SECTIONS, LABEL_SOURCE_SECTIONS, input_text, parse_sections, read_report
from mdfnet_hydra.mimic.tables import (
    DICOM_ID,
    PrepareError,
    datetime_column,
    id_column,
    locate_inputs,
    numeric_column,
    read_table,
    unique_key,
)

log = logging.getLogger(__name__)

OFFICIAL_SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}
VITALS = ("temperature", "heartrate", "resprate", "o2sat", "sbp", "dbp", "acuity")
LABEL_VALUES = (1.0, 0.0, -1.0)


class Report:
    """Counts at every step, label prevalence, feature missingness, problems and warnings."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.problems: dict[str, list[str]] = {}
        self.sections: dict[str, Any] = {}

    def step(self, name: str, frame: pd.DataFrame, unit: str = "studies") -> None:
        row = {"step": name, unit: int(len(frame)), "patients": int(frame["subject_id"].nunique())}
        self.steps.append(row)
        log.info("%-58s %8d %s, %6d patients", name, row[unit], unit, row["patients"])

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "warnings": self.warnings, "problems": self.problems, **self.sections}


def prepare(cfg) -> dict[str, Any]:
    wanted_sections = _check_text_config(cfg)
    _check_split_config(cfg)
    inputs = _locate_inputs(cfg, wanted_sections)
    problem = output_dir_problem(cfg)
    if problem:
        raise PrepareError(problem)
    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # half-written images and reports of a killed run
    report = Report()
    if set(wanted_sections) & set(LABEL_SOURCE_SECTIONS):
        message = (
            f"text.sections includes {sorted(set(wanted_sections) & set(LABEL_SOURCE_SECTIONS))}: MIMIC-CXR's "
            "CheXpert labels were derived from the findings and impression, so a text encoder fed them "
            "learns the labeller, not the patient"
        )
        log.warning(message)
        report.warnings.append(message)

    studies = _frontal_studies(inputs["metadata"], cfg, report)
    studies = _with_labels(inputs["chexpert"], studies, cfg, report)
    studies = _with_split(inputs.get("split"), studies, cfg, report)
    _check_train_and_val(studies, cfg, inputs.get("split"), "with the split")
    studies = _with_ed_stay(studies, inputs["edstays"], inputs["triage"], cfg, report)
    studies = _with_demographics(studies, inputs["patients"], cfg, report)
    studies = _with_text(studies, inputs.get("reports"), cfg, wanted_sections, report)
    studies = _with_images(inputs["images"], out, studies, cfg, report)

    _check_train_and_val(
        studies, cfg, inputs.get("split"), "after leaving out studies without a readable image (or an ED stay)"
    )
    manifest = _manifest(studies)
    write_manifest(manifest, out / "manifest.parquet")
    report.step("written to manifest.parquet", studies)
    report.sections["config"] = OmegaConf.to_container(cfg, resolve=True)
    report.sections["manifest_sha256"] = _sha256(out / "manifest.parquet")
    report.sections["label_prevalence"] = _prevalence(manifest)
    report.sections["clinical_missingness"] = _missingness(manifest)
    report.sections["implausible_values"] = _implausible(manifest)
    report.sections["split_sizes"] = {s: int((manifest.split == s).sum()) for s in SPLITS}
    write_text(out / "prepare_report.json", json.dumps(report.to_dict(), indent=2))
    markdown = _markdown(report)
    write_text(out / "prepare_report.md", markdown)
    log.info("\n%s", markdown)
    log.info(
        "prepared dataset: %s (train with: python -m mdfnet_hydra.train data=processed %s)",
        out,
        shlex.quote(f"data.root={out}"),
    )
    return report.to_dict()


def _sha256(path: Path) -> str:
    """The manifest's checksum in the report beside the config it was made with: a report left by an
    earlier run (one killed between writing the two) shows as not the manifest's."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_dir_problem(cfg) -> Optional[str]:
    """Why output_dir cannot take the prepared dataset, or None. Checked before Hydra writes its .hydra/
    record there (prepare.py), where a file in the way or a read-only folder ended in a traceback."""
    out = Path(str(cfg.output_dir)).expanduser().resolve()
    for option in ("cxr_jpg", "reports", "ed", "hosp"):
        if OmegaConf.is_missing(cfg.mimic, option):  # mimic.reports is not needed without text.sections
            continue
        source = Path(str(cfg.mimic[option])).expanduser().resolve()
        if out == source or source in out.parents:
            return (
                f"output_dir {out} is {'mimic.' + option if out == source else 'inside mimic.' + option} "
                f"({source}): the preparation writes images/ and its tables there; choose an output_dir outside "
                "the MIMIC folders"
            )
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is under the file {existing}"
        return f"output_dir {out} {where}: choose a folder (new or existing) for the prepared dataset"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output_dir {out} cannot be written: {existing} is not writable by this user; choose another output_dir"
    return None


def _check_text_config(cfg) -> list[str]:
    wanted = [str(s) for s in cfg.text.sections]
    unknown = [s for s in wanted if s not in KNOWN_SECTIONS]
    if unknown:
        raise PrepareError(f"text.sections has unknown sections {unknown}; known: {list(KNOWN_SECTIONS)}")
    leaking = sorted(set(wanted) & set(LABEL_SOURCE_SECTIONS))
    if leaking and not cfg.text.allow_label_source:
        raise PrepareError(
            f"text.sections includes {leaking}, report sections written after the read that MIMIC-CXR's CheXpert "
            "labels were extracted from (or repeat it): the model would learn the labeller. "
            "Pass text.allow_label_source=true to do it anyway."
        )
    return wanted


# Numeric options refused at start, before any table is read (as config.RANGES): outside these a
# preparation fails deep in the image workers (images.size 0 divides by zero) or writes nonsense.
PREPARE_RANGES: tuple[tuple[str, Optional[float], Optional[float], bool, bool, str], ...] = (
    ("images.size", MIN_IMAGE_SIZE, None, True, True, "pixels of the shorter side, one ViT patch at least"),
    ("images.quality", 1, 100, True, True, "PIL's JPEG quality"),
    ("images.workers", 0, None, True, True, "resizing processes; 0 or 1 resize in this process"),
    ("split.seed", 0, None, True, True, "random seeds are non-negative"),
    ("link.slack_hours", 0, None, True, True, "hours either side of an ED stay"),
    *(
        (f"checks.{name}", 0, 1, True, True, "a share of the studies; 0 turns the check off")
        for name in ("min_reports_found", "min_images_found", "min_patients_found", "min_ed_linked")
    ),
)


def _check_split_config(cfg) -> None:
    """The split and every numeric option, all problems in one line before any table is read."""
    problems = outside_ranges(cfg, PREPARE_RANGES)
    if cfg.split.kind not in ("official", "random"):
        problems.append(f"split.kind must be 'official' or 'random', got {cfg.split.kind!r}")
    elif cfg.split.kind == "random" and not _usable_fractions(cfg.split.fractions):
        problems.append(
            "split.fractions must be three numbers (train, val, test), each above 0 and at most 1, summing to 1 "
            f"(training needs train and val studies, every evaluation test studies), got {list(cfg.split.fractions)}"
        )
    if problems:
        raise PrepareError("invalid configuration: " + "; ".join(problems))


def _usable_fractions(values) -> bool:
    fractions = np.asarray(values, dtype=float)
    return (
        fractions.shape == (3,)
        and bool(np.all(np.isfinite(fractions)))
        and bool(np.all((fractions > 0) & (fractions <= 1)))
        and bool(np.isclose(fractions.sum(), 1.0))
    )


def _locate_inputs(cfg, wanted_sections: list[str]) -> dict[str, Path]:
    """Every table and folder this configuration reads, all checked before the first is read."""
    cxr, ed, hosp = (Path(p).expanduser() for p in (cfg.mimic.cxr_jpg, cfg.mimic.ed, cfg.mimic.hosp))
    tables = {
        "metadata": ("mimic.cxr_jpg", cxr, "mimic-cxr-2.0.0-metadata", ("",)),
        "chexpert": ("mimic.cxr_jpg", cxr, "mimic-cxr-2.0.0-chexpert", ("",)),
        "edstays": ("mimic.ed", ed, "edstays", ("", "ed")),
        "triage": ("mimic.ed", ed, "triage", ("", "ed")),
        "patients": ("mimic.hosp", hosp, "patients", ("", "hosp")),
    }
    if cfg.split.kind == "official":
        tables["split"] = ("mimic.cxr_jpg", cxr, "mimic-cxr-2.0.0-split", ("",))
    folders = {"images": ("mimic.cxr_jpg", cxr / "files", "the JPEGs as pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg")}
    if wanted_sections:
        folders["reports"] = (
            "mimic.reports",
            Path(cfg.mimic.reports).expanduser() / "files",
            "the reports as pXX/pXXXXXXXX/sXXXXXXXX.txt",
        )
    return locate_inputs(tables, folders)


def _require_studies(frame: pd.DataFrame, problem: str) -> None:
    """A join or filter that leaves nothing means the inputs do not belong together."""
    if frame.empty:
        raise PrepareError(problem)


def _check_found(found: int, total: int, option: str, cfg, what: str, expected: str, fix: str) -> None:
    """Stop when a source yields fewer than checks.<option> of what it must hold (a wrong folder
    yields none, a partial download a few) rather than writing a dataset without it."""
    minimum = float(cfg.checks[option])
    if total and found < minimum * total:
        raise PrepareError(
            f"found {found} of {total} {what} ({found / total:.0%}, fewer than checks.{option}="
            f"{minimum}); {expected}: {fix}, or lower checks.{option} for a partial download."
        )


def _frontal_studies(path: Path, cfg, report: Report) -> pd.DataFrame:
    ids = {"dicom_id": str, "subject_id": str, "study_id": str}
    meta = read_table(path, [*ids, "ViewPosition", "StudyDate", "StudyTime"], dtype=ids)
    meta["dicom_id"] = id_column(meta, "dicom_id", path, DICOM_ID)
    for column in ("subject_id", "study_id"):
        meta[column] = id_column(meta, column, path)
    unique_key(meta, ["dicom_id"], path, "image")
    report.step("metadata: images", meta, "images")
    report.sections["views"] = {str(k): int(v) for k, v in meta["ViewPosition"].fillna("(none)").value_counts().items()}
    preference = {view.upper(): rank for rank, view in enumerate(cfg.views)}
    meta = meta.assign(view_rank=meta["ViewPosition"].astype(str).str.upper().map(preference))
    meta = meta[meta["view_rank"].notna()]
    report.step(f"view in {list(cfg.views)}", meta, "images")
    _require_studies(
        meta,
        f"no image in {path} has a ViewPosition in views={list(cfg.views)}: "
        "check views (MIMIC-CXR-JPG uses PA, AP, LATERAL, LL, ...).",
    )
    if cfg.one_image_per_study:
        meta = meta.sort_values(["study_id", "view_rank", "dicom_id"])
        others = meta.groupby("study_id", sort=False)["dicom_id"].agg(lambda ids: list(ids)[1:])
        meta = meta.drop_duplicates("study_id", keep="first")
        meta = meta.assign(other_frontal=meta["study_id"].map(others))  # taken if the chosen image is unusable
        report.step("one image per study (view preference, then dicom_id)", meta)
    else:
        meta = meta.assign(other_frontal=[[] for _ in range(len(meta))])
    meta = meta.assign(
        study_time=[_study_time(d, t, path, i) for i, d, t in zip(meta.index, meta["StudyDate"], meta["StudyTime"])]
    )
    return meta.drop(columns=["view_rank"]).reset_index(drop=True)


def _study_time(date: Any, time: Any, path: Path, row: int) -> pd.Timestamp:
    try:
        day = pd.Timestamp(str(int(date)))
        t = float(time)
    except (TypeError, ValueError) as err:
        raise PrepareError(f"{path}: row {row + 2}: StudyDate {date!r} / StudyTime {time!r} unreadable") from err
    hours, minutes, seconds = (int(t // 10000), int(t % 10000 // 100), t % 100) if t >= 0 else (-1, 0, 0.0)
    if not (0 <= hours < 24 and minutes < 60 and seconds < 60):  # HHMMSS.fff; an empty one (NaN) fails too
        raise PrepareError(
            f"{path}: row {row + 2}: StudyDate {date!r} / StudyTime {time!r} unreadable (StudyTime is HHMMSS)"
        )
    return day + timedelta(hours=hours, minutes=minutes, seconds=seconds)


def _with_labels(path: Path, studies: pd.DataFrame, cfg, report: Report) -> pd.DataFrame:
    """Labels by (subject_id, study_id). A study without a row, or whose row names another subject,
    is left out, counted, and stops the run below checks.min_labels_found (tables of two releases)."""
    labels = read_table(path, ["subject_id", "study_id", *CHEXPERT_LABELS], dtype={"subject_id": str, "study_id": str})
    for column in ("subject_id", "study_id"):
        labels[column] = id_column(labels, column, path)
    unique_key(labels, ["subject_id", "study_id"], path, "study")
    for name in CHEXPERT_LABELS:
        values = numeric_column(labels, name, path)
        bad = values.notna() & ~values.isin(LABEL_VALUES)
        if bad.any():
            row = int(labels.index[bad][0])
            raise PrepareError(
                f"{path}: row {row + 2}: label '{name}' is {labels[name][row]}; expected 1, 0, -1 or empty"
            )
        labels[name] = values
    merged = studies.merge(
        labels[["subject_id", "study_id", *CHEXPERT_LABELS]],
        on=["subject_id", "study_id"],
        how="left",
        indicator="labelled",
    )
    found = (merged.pop("labelled") == "both").to_numpy()
    other_subject = ~found & merged["study_id"].isin(labels["study_id"]).to_numpy()
    report.sections["labels"] = {
        "studies with a chexpert row": int(found.sum()),
        "without a row (left out)": int((~found & ~other_subject).sum()),
        "row under another subject_id (left out)": int(other_subject.sum()),
    }
    if other_subject.any():
        report.problems["chexpert row under another subject_id (studies left out)"] = [
            f"subject {s}, study {st}"
            for s, st in zip(merged["subject_id"][other_subject], merged["study_id"][other_subject])
        ]
        _warn(
            report,
            f"{int(other_subject.sum())} chosen studies have their row in {path} under another subject_id than "
            "in the metadata table (listed in prepare_report.json); they are left out as unlabelled. "
            "The two tables must come from the same MIMIC-CXR-JPG release.",
        )
    _check_found(
        int(found.sum()),
        len(merged),
        "min_labels_found",
        cfg,
        f"chosen studies with a row of the same subject_id in {path}",
        "expected a row per study of the metadata table",
        "point mimic.cxr_jpg at one MIMIC-CXR-JPG release whose metadata and chexpert tables belong together",
    )
    merged = merged[found]
    report.step("with CheXpert labels", merged)
    _require_studies(
        merged,
        f"no chosen study has a row in {path}: the metadata and chexpert tables under "
        "mimic.cxr_jpg must come from the same MIMIC-CXR-JPG release.",
    )
    return merged


def _with_split(path: Path | None, studies: pd.DataFrame, cfg, report: Report) -> pd.DataFrame:
    if cfg.split.kind == "official":
        split = read_table(path, ["dicom_id", "split"], dtype={"dicom_id": str})
        split["dicom_id"] = id_column(split, "dicom_id", path, DICOM_ID)
        unique_key(split, ["dicom_id"], path, "image")
        unknown = ~split["split"].isin(OFFICIAL_SPLIT_NAMES)
        if unknown.any():
            row = int(split.index[unknown][0])
            raise PrepareError(
                f"{path}: row {row + 2}: split {split['split'][row]!r} is not one of {list(OFFICIAL_SPLIT_NAMES)}"
            )
        studies = studies.merge(split[["dicom_id", "split"]], on="dicom_id", how="left", indicator="listed")
        listed = (studies.pop("listed") == "both").to_numpy()
        _check_found(
            int(listed.sum()),
            len(studies),
            "min_split_found",
            cfg,
            f"chosen images listed in {path}",
            "expected a row per dicom_id of the metadata table",
            "point mimic.cxr_jpg at one MIMIC-CXR-JPG release whose metadata and split tables belong together "
            "(or use split.kind=random)",
        )
        report.sections["official_split"] = {"listed": int(listed.sum()), "not listed (left out)": int((~listed).sum())}
        studies = studies[listed].reset_index(drop=True)
        studies["split"] = studies["split"].map(OFFICIAL_SPLIT_NAMES)
        report.step("with an official split", studies)
        _require_studies(
            studies,
            f"no chosen image is listed in {path}: the metadata and split tables under "
            "mimic.cxr_jpg must come from the same MIMIC-CXR-JPG release.",
        )
    else:
        cut = np.cumsum(np.asarray(cfg.split.fractions, dtype=float))
        patients = studies["subject_id"].unique()
        draw = np.array([patient_draw(int(cfg.split.seed), int(p)) for p in patients])
        names = np.where(draw < cut[0], "train", np.where(draw < cut[1], "val", "test"))
        studies = studies.assign(split=studies["subject_id"].map(dict(zip(patients, names))))
        report.step(f"random patient-level split (seed {cfg.split.seed})", studies)
    per_patient = studies.groupby("subject_id")["split"].nunique()
    if (per_patient > 1).any():
        raise PrepareError(
            f"{int((per_patient > 1).sum())} patients fall in more than one split "
            f"(e.g. subject {per_patient[per_patient > 1].index[0]}); the split must be by patient"
        )
    return studies


def patient_draw(seed: int, subject_id: int) -> float:
    """A patient's number in [0, 1) for the random split, from the seed and the subject_id alone: adding
    or removing other patients (a partial download, another release) never moves a patient to another
    split, as one draw per patient in list order did."""
    digest = hashlib.sha256(f"mdfnet-hydra split {seed} {subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_train_and_val(studies: pd.DataFrame, cfg, split_path: Path | None, step: str) -> None:
    """Training fits on train and selects on val: a dataset without either cannot be trained on, so
    it is refused here rather than when training starts."""
    sizes = {name: int((studies["split"] == name).sum()) for name in SPLITS}
    if sizes["train"] and sizes["val"]:
        return
    if cfg.split.kind == "official":
        source = f"the split table {split_path}: check its split column (train / validate / test)"
    else:
        source = (
            f"split.kind=random (split.seed={cfg.split.seed}, split.fractions={list(cfg.split.fractions)}): "
            "change the seed or the fractions"
        )
    counts = ", ".join(f"{name} {count}" for name, count in sizes.items())
    raise PrepareError(
        f"{step}, the splits hold {counts} studies; training needs studies in both train and val. "
        f"The split comes from {source}."
    )


def _with_ed_stay(studies: pd.DataFrame, stays_path: Path, triage_path: Path, cfg, report: Report) -> pd.DataFrame:
    stays = read_table(
        stays_path, ["subject_id", "stay_id", "intime", "outtime"], dtype={"subject_id": str, "stay_id": str}
    )
    for column in ("subject_id", "stay_id"):
        stays[column] = id_column(stays, column, stays_path)
    unique_key(stays, ["stay_id"], stays_path, "ED stay")
    for column in ("intime", "outtime"):
        stays[column] = datetime_column(stays, column, stays_path)
    slack = pd.Timedelta(hours=float(cfg.link.slack_hours))
    pairs = studies[["study_id", "subject_id", "study_time"]].merge(
        stays[["subject_id", "stay_id", "intime", "outtime", *(["gender"] if "gender" in stays else [])]],
        on="subject_id",
    )
    inside = (pairs.study_time >= pairs.intime) & (pairs.study_time <= pairs.outtime)
    gap = np.maximum(pairs.intime - pairs.study_time, pairs.study_time - pairs.outtime)  # > 0 outside the stay
    pairs = pairs.assign(inside=inside, distance=gap.where(~inside, pd.Timedelta(0)))
    pairs = pairs[pairs.distance <= slack]
    best = pairs.sort_values(["study_id", "distance", "intime"], ascending=[True, True, False]).drop_duplicates(
        "study_id"
    )
    linked = studies.merge(best.drop(columns=["subject_id", "study_time", "distance"]), on="study_id", how="left")
    is_linked = linked["stay_id"].notna()
    report.sections["ed_link"] = {
        "inside an ED stay": int(linked["inside"].fillna(False).astype(bool).sum()),
        f"within {cfg.link.slack_hours} h slack only": int(
            (is_linked & ~linked["inside"].fillna(False).astype(bool)).sum()
        ),
        "no ED stay": int((~is_linked).sum()),
    }
    report.step("linked to an ED stay", linked[is_linked])
    _check_found(
        int(is_linked.sum()),
        len(linked),
        "min_ed_linked",
        cfg,
        f"studies linked to an ED stay of {stays_path}",
        f"expected stays of the same subject_id within link.slack_hours={cfg.link.slack_hours} of the study",
        "point mimic.ed at the MIMIC-IV-ED release of these MIMIC-CXR patients",
    )
    if not cfg.link.keep_unlinked:
        linked = linked[is_linked]
        report.step("unlinked studies dropped (link.keep_unlinked=false)", linked)
        _require_studies(
            linked,
            f"no study links to an ED stay of {stays_path} and link.keep_unlinked=false: "
            "check mimic.ed or keep unlinked studies.",
        )
    else:
        report.step("kept, unlinked ones with missing triage (link.keep_unlinked=true)", linked)
    return _with_triage(linked.drop(columns=["inside"]), triage_path, cfg, report)


def _with_triage(studies: pd.DataFrame, path: Path, cfg, report: Report) -> pd.DataFrame:
    """Triage values of each linked stay. A table that holds no row for most linked stays (empty,
    or of another release) would leave every vital missing: checks.min_triage_found stops it."""
    triage = read_table(path, ["stay_id", *VITALS, "pain", "chiefcomplaint"], dtype={"stay_id": str})
    triage["stay_id"] = id_column(triage, "stay_id", path)
    unique_key(triage, ["stay_id"], path, "ED stay")
    for column in VITALS:
        triage[column] = numeric_column(triage, column, path)
    pain = numeric_column(triage, "pain", path, allow_text=True)
    report.sections["pain_not_numeric"] = int((pain.isna() & triage["pain"].notna()).sum())
    triage["pain"] = pain
    merged = studies.merge(
        triage[["stay_id", *VITALS, "pain", "chiefcomplaint"]], on="stay_id", how="left", indicator="triaged"
    )
    triaged = (merged.pop("triaged") == "both").to_numpy()
    linked = int(merged["stay_id"].notna().sum())
    report.sections["triage"] = {
        "linked studies with a triage row": int(triaged.sum()),
        "without": linked - int(triaged.sum()),
    }
    _check_found(
        int(triaged.sum()),
        linked,
        "min_triage_found",
        cfg,
        f"ED-linked studies whose stay has a row in {path}",
        "expected a row per stay_id of the edstays table",
        "point mimic.ed at one MIMIC-IV-ED release whose edstays and triage tables belong together",
    )
    return merged


def _with_demographics(studies: pd.DataFrame, path: Path, cfg, report: Report) -> pd.DataFrame:
    patients = read_table(path, ["subject_id", "gender", "anchor_age", "anchor_year"], dtype={"subject_id": str})
    patients["subject_id"] = id_column(patients, "subject_id", path)
    unique_key(patients, ["subject_id"], path, "patient")
    for column in ("anchor_age", "anchor_year"):
        patients[column] = numeric_column(patients, column, path)
    columns = patients[["subject_id", "gender", "anchor_age", "anchor_year"]]
    merged = studies.merge(
        columns.rename(columns={"gender": "patient_gender"}), on="subject_id", how="left", indicator="patient_found"
    )
    found = int((merged.pop("patient_found") == "both").sum())
    _check_found(
        found,
        len(merged),
        "min_patients_found",
        cfg,
        f"studies with their patient in {path}",
        "expected a row per MIMIC-CXR subject_id",
        "point mimic.hosp at the MIMIC-IV release (hosp/patients) of these MIMIC-CXR patients",
    )
    merged["age"] = merged["anchor_age"] + (merged["study_time"].dt.year - merged["anchor_year"])
    sex, unrecognised = _sex(merged["patient_gender"])
    if "gender" in merged:  # the ED stay's record where MIMIC-IV has none (no row, blank or unrecognised)
        ed_sex, ed_unrecognised = _sex(merged["gender"])
        sex, unrecognised = sex.fillna(ed_sex), unrecognised | ed_unrecognised
    merged["sex"] = sex
    report.sections["patients_without_demographics"] = int(merged["anchor_age"].isna().sum())
    report.sections["sex"] = {"missing": int(sex.isna().sum()), "unrecognised gender values": int(unrecognised.sum())}
    if unrecognised.any():
        values = sorted(
            {
                str(v)
                for column in ("patient_gender", "gender")
                if column in merged
                for v in merged[column][_sex(merged[column])[1]]
            }
        )
        _warn(
            report,
            f"{int(unrecognised.sum())} studies have a gender other than M / F / male / female (any case) in {path} "
            f"or their ED stay ({', '.join(repr(v) for v in values[:SHOWN_VALUES])}): read as missing",
        )
    return merged


SEX_WORDS = {"m": "M", "male": "M", "f": "F", "female": "F"}
SHOWN_VALUES = 5  # unrecognised values named in a warning


def _sex(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """('M' / 'F' or missing, whether a non-blank value was not recognised): MIMIC writes M / F, other
    exports m, male or Female; anything else becomes missing, counted, rather than a third category."""
    sex = values.map(lambda v: SEX_WORDS.get(v.strip().lower()) if isinstance(v, str) else None).astype(object)
    blank = values.isna() | (values.astype(str).str.strip() == "")
    return sex, ~blank & sex.isna()


def _warn(report: Report, message: str) -> None:
    """A problem the run goes on with: on the console and in the report (json and markdown)."""
    log.warning(message)
    report.warnings.append(message)


def _with_text(
    studies: pd.DataFrame, reports_files: Path | None, cfg, wanted: list[str], report: Report
) -> pd.DataFrame:
    if reports_files is None:  # text.sections is empty: the reports are not read
        report.sections["text"] = {"reports": "not read (text.sections is empty)"}
        return studies.assign(text=[input_text({}, [], _complaint(c, cfg)) for c in studies["chiefcomplaint"]])
    texts, present, missing = [], {name: 0 for name in wanted}, []
    for subject, study, complaint in zip(studies["subject_id"], studies["study_id"], studies["chiefcomplaint"]):
        path = reports_files / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}.txt"
        raw = read_report(path)
        if raw is None:
            missing.append(path)
        sections = parse_sections(raw) if raw is not None else {}
        for name in wanted:
            present[name] += bool(sections.get(name))
        texts.append(input_text(sections, wanted, _complaint(complaint, cfg)))
    found = len(studies) - len(missing)
    _check_found(
        found,
        len(studies),
        "min_reports_found",
        cfg,
        f"reports under {reports_files}",
        f"expected one per study as pXX/pXXXXXXXX/sXXXXXXXX.txt, e.g. {missing[0] if missing else ''}",
        "point mimic.reports at the MIMIC-CXR release folder whose files/ holds the reports",
    )
    report.sections["text"] = {
        "reports found": found,
        "reports missing": len(missing),
        **{f"with {name}": count for name, count in present.items()},
        "empty text": int(sum(1 for t in texts if not t)),
    }
    return studies.assign(text=texts)


def _complaint(complaint: Any, cfg) -> str | None:
    return complaint if cfg.text.chief_complaint and isinstance(complaint, str) else None


USABLE = ("done", "remade", "reused")


def _image_tasks(studies: pd.DataFrame, dicoms: list[str], images: Path, out: Path, cfg) -> tuple[list, list]:
    """(paths relative to output_dir, resize tasks) of one image per study."""
    relative = [
        f"images/p{str(s)[:2]}/p{s}/s{st}/{d}.jpg" for s, st, d in zip(studies.subject_id, studies.study_id, dicoms)
    ]
    size, quality = int(cfg.images.size), int(cfg.images.quality)
    return relative, [(str(images / r[len("images/") :]), str(out / r), size, quality) for r in relative]


def _other_frontal(images: Path, out: Path, studies: pd.DataFrame, results: list, cfg, report: Report):
    """A study whose preferred image is missing or unreadable takes its next frontal one (its AP for a
    lost PA), in view preference order, rather than leaving the study out."""
    studies, results, taken = studies.copy(), list(results), 0
    for turn in range(max((len(o) for o in studies["other_frontal"]), default=0)):
        rows = [
            i
            for i, (state, _) in enumerate(results)
            if state not in USABLE and len(studies["other_frontal"].iat[i]) > turn
        ]
        if not rows:
            break
        dicoms = [studies["other_frontal"].iat[i][turn] for i in rows]
        _, tasks = _image_tasks(studies.iloc[rows], dicoms, images, out, cfg)
        for i, dicom, result in zip(rows, dicoms, resize_all(tasks, int(cfg.images.workers))):
            if result[0] in USABLE:
                studies.iat[i, studies.columns.get_loc("dicom_id")] = dicom
                results[i], taken = result, taken + 1
    report.sections["other_frontal_image_used"] = taken
    if taken:
        log.info("%d studies whose preferred image is missing or unreadable use another frontal image", taken)
    return studies, results


def _with_images(images: Path, out: Path, studies: pd.DataFrame, cfg, report: Report) -> pd.DataFrame:
    _, tasks = _image_tasks(studies, list(studies.dicom_id), images, out, cfg)
    results = resize_all(tasks, int(cfg.images.workers))
    first_sources = [Path(t[0]) for t in tasks]
    studies, results = _other_frontal(images, out, studies, results, cfg, report)
    relative, _ = _image_tasks(studies, list(studies.dicom_id), images, out, cfg)
    status = pd.Series([s for s, _ in results], index=studies.index)
    counts = status.value_counts().to_dict()
    report.sections["images"] = {k: int(counts.get(k, 0)) for k in STATUSES}
    if counts.get("remade"):
        log.info(
            "%d images in %s made with other settings were re-made (images.size=%s, images.quality=%s)",
            counts["remade"],
            out / "images",
            cfg.images.size,
            cfg.images.quality,
        )
    for kind in ("missing", "unreadable"):
        rows = [
            f"subject {s}, study {st}: {detail}"
            for (s, st), (state, detail) in zip(zip(studies.subject_id, studies.study_id), results)
            if state == kind
        ]
        if rows:
            report.problems[f"{kind} images (studies left out)"] = rows
            log.warning("%d studies left out: %s image; listed in prepare_report.json", len(rows), kind)
    usable = status.isin(USABLE).to_numpy()
    example = next((src for src, (state, _) in zip(first_sources, results) if state in ("missing", "unreadable")), "")
    _check_found(
        int(usable.sum()),
        len(studies),
        "min_images_found",
        cfg,
        f"chosen images under {images}",
        f"expected readable JPEGs as pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg ({counts.get('missing', 0)} "
        f"missing, {counts.get('unreadable', 0)} unreadable, e.g. {example})",
        "point mimic.cxr_jpg at the MIMIC-CXR-JPG release folder whose files/ holds the JPEGs",
    )
    kept = studies.assign(image_path=relative)[usable].drop(columns=["other_frontal"])
    report.step("with a readable image", kept)
    _require_studies(kept, f"no chosen study has a readable image under {images}: check mimic.cxr_jpg.")
    return kept


def _manifest(studies: pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "sample_id": studies["dicom_id"].astype(str).to_numpy(),
            "patient_id": studies["subject_id"].astype(str).to_numpy(),
            "split": studies["split"].to_numpy(),
            "image_path": studies["image_path"].to_numpy(),
            "text": studies["text"].to_numpy(),
        }
    )
    for name in CLINICAL_FEATURES:
        frame[name] = studies[name].to_numpy() if name == "sex" else studies[name].astype(float).to_numpy()
    for name in CHEXPERT_LABELS:
        frame[name] = studies[name].astype(float).to_numpy()
    frame["study_id"] = studies["study_id"].astype(str).to_numpy()
    return frame


def _prevalence(manifest: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in SPLITS:
        part = manifest[manifest.split == split]
        out[split] = {
            name: {
                "positive": int((part[name] == 1).sum()),
                "negative": int((part[name] == 0).sum()),
                "uncertain": int((part[name] == -1).sum()),
                "blank": int(part[name].isna().sum()),
            }
            for name in CHEXPERT_LABELS
        }
    return out


def _unusable(manifest: pd.DataFrame, name: str) -> pd.Series:
    """Missing, or implausible (a temperature of 1000 F): what training treats as missing."""
    values = manifest[name]
    return values.isna() if name == "sex" else values.isna() | implausible(name, values)


def _missingness(manifest: pd.DataFrame) -> dict[str, Any]:
    return {
        split: {
            name: round(float(_unusable(manifest, name)[manifest.split == split].mean()), 4)
            if (manifest.split == split).any()
            else None
            for name in CLINICAL_FEATURES
        }
        for split in SPLITS
    }


def _implausible(manifest: pd.DataFrame) -> dict[str, int]:
    """Recorded values outside labels.PLAUSIBLE_RANGES per feature (counted as missing above)."""
    return {name: int(implausible(name, manifest[name]).sum()) for name in CLINICAL_FEATURES if name != "sex"}


def _markdown(report: Report) -> str:
    lines = ["# MIMIC preparation report", "", "| step | count | patients |", "| --- | --- | --- |"]
    for step in report.steps:
        count = step.get("studies", step.get("images"))
        unit = "images" if "images" in step else "studies"
        lines.append(f"| {step['step']} | {count} {unit} | {step['patients']} |")
    for key in ("labels", "official_split", "ed_link", "triage", "sex", "text", "images", "split_sizes"):
        if key in report.sections:
            lines += ["", f"{key.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in report.sections[key].items())]
    lines += [
        "",
        "label prevalence (positive / negative / uncertain / blank):",
        "",
        "| label | " + " | ".join(SPLITS) + " |",
        "| --- |" + " --- |" * len(SPLITS),
    ]
    for name in CHEXPERT_LABELS:
        cells = []
        for split in SPLITS:
            c = report.sections["label_prevalence"][split][name]
            cells.append(f"{c['positive']} / {c['negative']} / {c['uncertain']} / {c['blank']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "clinical feature missingness (fraction missing or implausible, as training treats them):",
        "",
        "| feature | " + " | ".join(SPLITS) + " |",
        "| --- |" + " --- |" * len(SPLITS),
    ]
    for name in CLINICAL_FEATURES:
        lines.append(
            f"| {name} | " + " | ".join(str(report.sections["clinical_missingness"][s][name]) for s in SPLITS) + " |"
        )
    implausible_counts = ", ".join(f"{k} {v}" for k, v in report.sections["implausible_values"].items() if v)
    lines += ["", f"implausible values (outside labels.PLAUSIBLE_RANGES): {implausible_counts or 'none'}"]
    if report.sections.get("other_frontal_image_used"):
        lines += [
            "",
            f"other frontal image used (preferred one missing or unreadable): "
            f"{report.sections['other_frontal_image_used']} studies",
        ]
    for name, rows in report.problems.items():
        lines += ["", f"{name}: {len(rows)} (listed in prepare_report.json)"]
    for warning in report.warnings:
        lines += ["", f"WARNING: {warning}"]
    return "\n".join(lines)
