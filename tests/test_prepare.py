"""MIMIC preparation on a fake MIMIC tree with the real file names, columns and quirks."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

import fake_mimic
from conftest import REPO
from mdfnet_hydra.config import PrepareConfig
from mdfnet_hydra.data.manifest import read_manifest
from mdfnet_hydra.labels import CHEXPERT_LABELS
from mdfnet_hydra.mimic.build import prepare
from mdfnet_hydra.mimic.reports import BEFORE_READ_SECTIONS, input_text, parse_sections
from mdfnet_hydra.mimic.tables import PrepareError

EXPECTED_SAMPLES = {"d-pa-1", "d-ap-2", "d-pa-3", "d-pa-4", "d-pa-7"}


def make_cfg(paths: dict, out: Path, **overrides):
    base = {
        "mimic": {k: str(v) for k, v in paths.items()},
        "output_dir": str(out),
        "images": {"workers": 1, "size": 128},
    }
    return OmegaConf.merge(OmegaConf.structured(PrepareConfig), base, overrides)


@pytest.fixture
def tree(tmp_path):
    return fake_mimic.build(tmp_path / "mimic")


@pytest.fixture
def prepared(tree, tmp_path):
    out = tmp_path / "prepared"
    report = prepare(make_cfg(tree, out))
    return out, read_manifest(out / "manifest.parquet").set_index("sample_id"), report


def test_frontal_one_image_per_study_and_missing_images_reported(prepared):
    out, manifest, report = prepared
    assert set(manifest.index) == EXPECTED_SAMPLES
    assert "d-ap-3" not in manifest.index, "PA is preferred over AP within a study"
    assert not manifest.index.str.contains("lat").any(), "lateral views are filtered out"
    missing = report["problems"]["missing images (studies left out)"]
    assert len(missing) == 1 and "study 58937611" in missing[0]
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["problems"] == report["problems"]
    steps = {s["step"]: s for s in saved["steps"]}
    assert steps["metadata: images"]["images"] == 9 and steps["with a readable image"]["studies"] == 5
    assert "missing images (studies left out): 1" in (out / "prepare_report.md").read_text()


def test_labels_row_by_row(prepared):
    _, manifest, report = prepared
    row = manifest.loc["d-pa-1"]
    assert (row["Pleural Effusion"], row["Pneumothorax"], row["Edema"]) == (1.0, 0.0, -1.0)
    assert all(
        math.isnan(row[name]) for name in CHEXPERT_LABELS if name not in ("Pleural Effusion", "Pneumothorax", "Edema")
    )
    assert manifest.loc["d-pa-4", "Pneumonia"] == -1.0 and manifest.loc["d-pa-4", "Fracture"] == 1.0
    prevalence = report["label_prevalence"]
    assert prevalence["train"]["Pleural Effusion"] == {"positive": 1, "negative": 0, "uncertain": 0, "blank": 2}


def test_clinical_features_row_by_row(prepared):
    _, m, report = prepared
    inside = m.loc["d-pa-1"]  # inside ED stay 30000001
    assert (
        inside.temperature,
        inside.heartrate,
        inside.resprate,
        inside.o2sat,
        inside.sbp,
        inside.dbp,
        inside.pain,
        inside.acuity,
    ) == (98.4, 88.0, 18.0, 97.0, 120.0, 80.0, 5.0, 2.0)
    assert (inside.age, inside.sex) == (52.0, "F")
    slack = m.loc["d-pa-4"]  # 4 h after the stay ended: linked with the default 6 h slack
    assert (slack.heartrate, slack.pain, slack.acuity) == (110.0, 8.0, 1.0) and math.isnan(slack.temperature)
    assert slack.age == 70 + (2122 - 2120)
    for unlinked in ("d-ap-2", "d-pa-3"):  # no ED stay around the study: kept, triage missing
        assert all(math.isnan(m.loc[unlinked, f]) for f in ("temperature", "heartrate", "pain", "acuity"))
    assert (m.loc["d-pa-3", "age"], m.loc["d-pa-3", "sex"]) == (86.0, "M")
    no_patient = m.loc["d-pa-7"]  # absent from patients.csv: sex from the ED stay, age unknown
    assert math.isnan(no_patient.age) and no_patient.sex == "M" and no_patient.temperature == 986.0
    assert report["ed_link"] == {"inside an ED stay": 3, "within 6.0 h slack only": 1, "no ED stay": 2}
    assert report["pain_not_numeric"] == 1  # "unable"
    assert report["clinical_missingness"]["val"]["temperature"] == 1.0


def test_text_comes_from_before_the_read(prepared):
    _, m, _ = prepared
    assert m.loc["d-pa-1", "text"] == (
        "INDICATION: ___F with new onset ascites // eval for infection CHIEF COMPLAINT: Abd pain, Abdominal distention"
    )
    assert m.loc["d-pa-3", "text"] == "HISTORY: Shortness of breath, history of CHF."
    assert m.loc["d-ap-2", "text"] == "", "no INDICATION, no ED stay: no text rather than the findings"
    assert m.loc["d-pa-7", "text"] == "CHIEF COMPLAINT: Line check", "no report file"
    for text in m.text:
        assert "FINDINGS" not in text and "IMPRESSION" not in text and "effusion" not in text.lower()


def test_findings_need_explicit_permission_and_warn(tree, tmp_path):
    sections = ["indication", "findings", "impression"]
    with pytest.raises(PrepareError, match="allow_label_source=true"):
        prepare(make_cfg(tree, tmp_path / "a", text={"sections": sections}))
    report = prepare(make_cfg(tree, tmp_path / "b", text={"sections": sections, "allow_label_source": True}))
    assert any("learns the labeller" in w for w in report["warnings"])
    text = read_manifest(tmp_path / "b" / "manifest.parquet").set_index("sample_id").loc["d-pa-1", "text"]
    assert "FINDINGS: There is a small left pleural effusion" in text


def test_split_is_by_patient(prepared, tree, tmp_path):
    _, m, _ = prepared
    assert m.loc["d-pa-3", "split"] == "val", "official 'validate' becomes val"
    assert m.groupby("patient_id").split.nunique().max() == 1
    random_a = prepare(make_cfg(tree, tmp_path / "r1", split={"kind": "random", "seed": 2}))
    random_b = prepare(make_cfg(tree, tmp_path / "r2", split={"kind": "random", "seed": 2}))
    a = read_manifest(tmp_path / "r1" / "manifest.parquet")
    b = read_manifest(tmp_path / "r2" / "manifest.parquet")
    assert a.split.tolist() == b.split.tolist() and random_a["split_sizes"] == random_b["split_sizes"]
    assert a.groupby("patient_id").split.nunique().max() == 1


def test_official_split_that_mixes_a_patient_is_refused(tree, tmp_path):
    split_csv = tree["cxr_jpg"] / "mimic-cxr-2.0.0-split.csv"
    split = pd.read_csv(split_csv)
    split.loc[split.dicom_id == "d-ap-2", "split"] = "test"  # patient 10000032 now in train and test
    split.to_csv(split_csv, index=False)
    with pytest.raises(PrepareError, match="more than one split"):
        prepare(make_cfg(tree, tmp_path / "out"))


def test_slack_and_dropping_unlinked_studies(tree, tmp_path):
    prepare(make_cfg(tree, tmp_path / "tight", link={"slack_hours": 1}))
    tight = read_manifest(tmp_path / "tight" / "manifest.parquet").set_index("sample_id")
    assert math.isnan(tight.loc["d-pa-4", "heartrate"]), "4 h outside the stay is not linked with 1 h slack"
    split_csv = tree["cxr_jpg"] / "mimic-cxr-2.0.0-split.csv"  # the val patient has no ED stay: give val another
    edit_table(split_csv, lambda f: f.replace({"split": {"test": "validate"}}))
    prepare(make_cfg(tree, tmp_path / "linked", link={"keep_unlinked": False}))
    linked = read_manifest(tmp_path / "linked" / "manifest.parquet")
    assert set(linked.sample_id) == {"d-pa-1", "d-pa-4", "d-pa-7"}


def test_images_are_resized_once_and_reused(prepared, tree):
    out, m, report = prepared
    with Image.open(out / m.loc["d-pa-1", "image_path"]) as image:
        assert min(image.size) == 128 and image.mode == "L"
    assert report["images"] == {"done": 5, "remade": 0, "reused": 0, "missing": 1, "unreadable": 0}
    again = prepare(make_cfg(tree, out))
    assert again["images"]["done"] == 0 and again["images"]["reused"] == 5


@pytest.mark.parametrize(
    "damage, message",
    [
        ("label", r"mimic-cxr-2.0.0-chexpert.csv.gz: row \d+: label 'Edema' is 2.0"),
        ("csv", r"mimic-cxr-2.0.0-metadata.csv.gz: cannot be read as CSV"),
        ("column", r"triage.csv.gz: missing columns \['acuity'\]"),
    ],
)
def test_bad_input_names_file_and_row(tree, tmp_path, damage, message):
    cxr = tree["cxr_jpg"]
    if damage == "label":
        labels = pd.read_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz")
        labels.loc[2, "Edema"] = 2.0
        labels.to_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    elif damage == "csv":
        (cxr / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(b"\x1f\x8b\x08garbage")
    else:
        path = tree["ed"] / "ed" / "triage.csv.gz"
        pd.read_csv(path).drop(columns=["acuity"]).to_csv(path, index=False)
    with pytest.raises(PrepareError, match=message):
        prepare(make_cfg(tree, tmp_path / "out"))


def test_unreadable_image_is_listed_not_fatal(tree, tmp_path):
    image = fake_mimic.study_dir(tree["cxr_jpg"], 10000898, 50771383) / "d-pa-4.jpg"
    image.write_bytes(b"not a jpeg")
    report = prepare(make_cfg(tree, tmp_path / "out"))
    (listed,) = report["problems"]["unreadable images (studies left out)"]
    assert "study 50771383" in listed
    assert "d-pa-4" not in set(read_manifest(tmp_path / "out" / "manifest.parquet").sample_id)


def test_report_section_parser():
    sections = parse_sections(fake_mimic.REPORT_WITH_INDICATION)
    assert sections["indication"] == "___F with new onset ascites // eval for infection"
    assert sections["impression"] == "Small left effusion."
    assert parse_sections("REASON FOR EXAMINATION: eval line\nFINDINGS: ok")["reason_for_exam"].startswith("eval line")


def test_cli_prepares_and_the_trainer_reads_it(tree, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "prepared"
    args = [f"mimic.{k}={v}" for k, v in tree.items()] + [f"output_dir={out}", "images.workers=2", "images.size=64"]
    result = subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.prepare", *args], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| with a readable image | 5 studies | 4 |" in result.stdout
    assert (out / ".hydra" / "config.yaml").is_file()
    from conftest import run_cli

    train = run_cli(
        "data=processed",
        f"data.root={out}",
        "debug=fast",
        "stage=stage1",
        "trainer.batch_size=1",
        "trainer.grad_accum=1",
        f"paths.root={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["stages"]["stage1"]["train_samples"] == 3


# ---------------------------------------------------------------- wrong input never yields a dataset


def test_every_missing_input_is_named_before_any_table_is_read(tree, tmp_path, monkeypatch):
    (tree["cxr_jpg"] / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    (tree["ed"] / "ed" / "triage.csv.gz").unlink()
    shutil.rmtree(tree["reports"] / "files")
    paths = dict(tree, hosp=tmp_path / "nowhere")

    def no_reading(*args, **kwargs):
        raise AssertionError("a table was read before the inputs were checked")

    monkeypatch.setattr("mdfnet_hydra.mimic.build.read_table", no_reading)
    with pytest.raises(PrepareError, match=r"^4 input\(s\) missing") as err:
        prepare(make_cfg(paths, tmp_path / "out"))
    message = str(err.value)
    for missing in (
        "mimic-cxr-2.0.0-chexpert table (mimic.cxr_jpg=",
        "triage table (mimic.ed=",
        f"patients table (mimic.hosp={tmp_path / 'nowhere'}",
        f"{tree['reports'] / 'files'} (mimic.reports",
    ):
        assert missing in message
    assert "metadata" not in message and "edstays" not in message
    assert not (tmp_path / "out").exists()


def test_reports_are_not_required_when_no_section_is_wanted(tree, tmp_path):
    shutil.rmtree(tree["reports"] / "files")
    prepare(make_cfg(tree, tmp_path / "out", text={"sections": []}))
    m = read_manifest(tmp_path / "out" / "manifest.parquet").set_index("sample_id")
    assert m.loc["d-pa-1", "text"] == "CHIEF COMPLAINT: Abd pain, Abdominal distention"


def test_wrong_reports_folder_fails_naming_it(tree, tmp_path):
    wrong = dict(tree, reports=tree["cxr_jpg"])  # has files/pXX/... but no reports in it
    with pytest.raises(
        PrepareError,
        match=r"found 0 of 6 reports under .*mimic-cxr-jpg/files \(0%.*\); expected one "
        r"per study as pXX/pXXXXXXXX/sXXXXXXXX.txt, e.g. .*/p10/p10000032/"
        r"s50414267.txt: point mimic.reports at",
    ):
        prepare(make_cfg(wrong, tmp_path / "out"))


def test_partial_reports_fail_unless_the_check_is_lowered(tree, tmp_path):
    for path in sorted((tree["reports"] / "files").rglob("*.txt"))[1:]:
        path.unlink()  # 1 of 6 studies keeps its report
    with pytest.raises(PrepareError, match=r"found 1 of 6 reports .*fewer than checks.min_reports_found=0.5"):
        prepare(make_cfg(tree, tmp_path / "a"))
    report = prepare(make_cfg(tree, tmp_path / "b", checks={"min_reports_found": 0.1}))
    assert report["text"]["reports found"] == 1


def test_cxr_without_its_image_folder_fails(tree, tmp_path):
    shutil.rmtree(tree["cxr_jpg"] / "files")
    with pytest.raises(PrepareError, match=r"1 input\(s\) missing: the folder .*mimic-cxr-jpg/files \(mimic.cxr_jpg"):
        prepare(make_cfg(tree, tmp_path / "out"))
    (tree["cxr_jpg"] / "files" / "p10").mkdir(parents=True)  # the folder, but not the images
    with pytest.raises(
        PrepareError,
        match=r"found 0 of 6 chosen images under .*mimic-cxr-jpg/files .*\(6 missing, "
        r"0 unreadable, e.g. .*d-pa-1.jpg\): point mimic.cxr_jpg at",
    ):
        prepare(make_cfg(tree, tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_partial_images_fail_unless_the_check_is_lowered(tree, tmp_path):
    for dicom, subject, study in (  # one train and the val study keep their image
        ("d-pa-1", 10000032, 50414267),
        ("d-ap-2", 10000032, 53189527),
        ("d-pa-4", 10000898, 50771383),
    ):
        (fake_mimic.study_dir(tree["cxr_jpg"], subject, study) / f"{dicom}.jpg").unlink()
    with pytest.raises(PrepareError, match=r"found 2 of 6 chosen images .*fewer than checks.min_images_found=0.5"):
        prepare(make_cfg(tree, tmp_path / "a"))
    prepare(make_cfg(tree, tmp_path / "b", checks={"min_images_found": 0.25}))
    assert set(read_manifest(tmp_path / "b" / "manifest.parquet").sample_id) == {"d-pa-3", "d-pa-7"}


def test_ed_and_patients_of_other_patients_fail(tree, tmp_path):
    stays = tree["ed"] / "ed" / "edstays.csv.gz"
    pd.read_csv(stays).assign(subject_id=lambda f: f.subject_id + 1).to_csv(stays, index=False)
    with pytest.raises(PrepareError, match=r"found 0 of 6 studies linked to an ED stay of .*edstays.csv.gz.*mimic.ed"):
        prepare(make_cfg(tree, tmp_path / "a"))
    prepare(make_cfg(tree, tmp_path / "b", checks={"min_ed_linked": 0}))
    patients = tree["hosp"] / "hosp" / "patients.csv.gz"
    pd.read_csv(patients).assign(subject_id=lambda f: f.subject_id + 1).to_csv(patients, index=False)
    with pytest.raises(PrepareError, match=r"found 0 of 6 studies with their patient in .*patients.csv.gz.*mimic.hosp"):
        prepare(make_cfg(tree, tmp_path / "c", checks={"min_ed_linked": 0}))


def test_label_table_cut_mid_row_is_refused(tree, tmp_path):
    path = tree["cxr_jpg"] / "mimic-cxr-2.0.0-chexpert.csv.gz"
    with gzip.open(path, "rt") as handle:
        text = handle.read()
    with gzip.open(path, "wt") as handle:  # a valid gzip whose last row stops after 3 of 16 fields
        handle.write(text[: text.rstrip("\n").rfind("\n") + 1] + "10001401,55555555,1.0")
    with pytest.raises(
        PrepareError,
        match=r"mimic-cxr-2.0.0-chexpert.csv.gz: 1 row\(s\) do not have the header's 16 "
        r"fields \(line 8 has 3\).*download it again",
    ):
        prepare(make_cfg(tree, tmp_path / "out"))


def test_rows_with_too_many_fields_are_named_by_line(tree, tmp_path):
    path = tree["ed"] / "ed" / "edstays.csv.gz"
    with gzip.open(path, "rt") as handle:
        lines = handle.read().splitlines()
    lines[2] += ",extra"
    lines[4] = lines[4].rsplit(",", 2)[0]
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    with pytest.raises(
        PrepareError,
        match=r"edstays.csv.gz: 2 row\(s\) do not have the header's 9 fields "
        r"\(line 3 has 10, line 5 has 7\)",
    ):
        prepare(make_cfg(tree, tmp_path / "out"))


def test_images_of_other_settings_are_remade_not_reused(prepared, tree):
    out, m, _ = prepared
    image = out / m.loc["d-pa-1", "image_path"]
    smaller = prepare(make_cfg(tree, out, images={"size": 64, "workers": 1}))
    assert smaller["images"] == {"done": 0, "remade": 5, "reused": 0, "missing": 1, "unreadable": 0}
    with Image.open(image) as opened:
        assert min(opened.size) == 64
    assert prepare(make_cfg(tree, out, images={"size": 64, "workers": 1}))["images"]["reused"] == 5
    other_quality = prepare(make_cfg(tree, out, images={"size": 64, "quality": 80, "workers": 1}))
    assert other_quality["images"]["remade"] == 5
    with Image.open(image) as opened:  # an image of an older preparation, without the settings stamp
        pixels = np.asarray(opened)
    Image.fromarray(pixels).save(image, format="JPEG", quality=80)
    again = prepare(make_cfg(tree, out, images={"size": 64, "quality": 80, "workers": 1}))
    assert (again["images"]["remade"], again["images"]["reused"]) == (1, 4)


def test_label_source_sections_include_wet_read_notification_addendum(tree, tmp_path):
    for section in ("wet_read", "notification", "addendum"):
        with pytest.raises(PrepareError, match="allow_label_source=true"):
            prepare(make_cfg(tree, tmp_path / section, text={"sections": ["indication", section]}))


@pytest.mark.parametrize("layout", sorted(fake_mimic.LEAKY_REPORTS))
def test_the_read_never_reaches_the_input_text(layout):
    sections = parse_sections(fake_mimic.LEAKY_REPORTS[layout])
    text = input_text(sections, list(BEFORE_READ_SECTIONS), None)
    assert sections["indication"].rstrip(".") == "cough"
    assert "effusion" not in text.lower(), text


@pytest.mark.parametrize("layout", sorted(fake_mimic.ALLOWED_REPORTS))
def test_before_the_read_sections_still_pass(layout):
    report, expected = fake_mimic.ALLOWED_REPORTS[layout]
    sections = parse_sections(report)
    assert {name: sections.get(name) for name in expected} == expected
    assert "effusion" not in input_text(sections, list(BEFORE_READ_SECTIONS), None).lower()


def test_leaky_report_layouts_end_to_end(tree, tmp_path):
    path = fake_mimic.study_dir(tree["reports"], 10000032, 50414267).with_suffix(".txt")
    path.write_text(fake_mimic.LEAKY_REPORTS["combined header"])
    prepare(make_cfg(tree, tmp_path / "out"))
    m = read_manifest(tmp_path / "out" / "manifest.parquet").set_index("sample_id")
    assert m.loc["d-pa-1", "text"] == "INDICATION: cough CHIEF COMPLAINT: Abd pain, Abdominal distention"


# ---------------------------------------------------------------- tables checked before any image work


def edit_table(path: Path, edit) -> None:
    """Rewrite a table through `edit(frame) -> frame`, every cell kept as the text it was."""
    edit(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def no_image_work(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("images were resized before the tables were checked")

    monkeypatch.setattr("mdfnet_hydra.mimic.build.resize_all", refuse)


def repeat_first_row(frame: pd.DataFrame, column: str | None = None, value: str = "") -> pd.DataFrame:
    """The table with its first row once more at the end (with `column` set to `value`, if given)."""
    copy = frame.iloc[[0]].copy()
    if column is not None:
        copy[column] = value
    return pd.concat([frame, copy], ignore_index=True)


@pytest.mark.parametrize(
    "root, table, edit, key, example",
    [
        (
            "cxr_jpg",
            "mimic-cxr-2.0.0-chexpert.csv.gz",
            lambda f: repeat_first_row(f, "Edema", "1.0"),  # the same study, a conflicting label
            "subject_id/study_id",
            "subject_id 10000032, study_id 50414267",
        ),
        ("cxr_jpg", "mimic-cxr-2.0.0-metadata.csv.gz", repeat_first_row, "dicom_id", "dicom_id d-pa-1"),
        ("cxr_jpg", "mimic-cxr-2.0.0-split.csv", repeat_first_row, "dicom_id", "dicom_id d-pa-1"),
        ("hosp", "hosp/patients.csv.gz", repeat_first_row, "subject_id", "subject_id 10000032"),
        ("ed", "ed/triage.csv.gz", repeat_first_row, "stay_id", "stay_id 30000001"),
        ("ed", "ed/edstays.csv.gz", repeat_first_row, "stay_id", "stay_id 30000001"),
    ],
)
def test_repeated_keys_are_refused_before_any_image_naming_file_and_rows(
    tree, tmp_path, monkeypatch, root, table, edit, key, example
):
    path = tree[root] / table
    rows = len(pd.read_csv(path))
    edit_table(path, edit)
    no_image_work(monkeypatch)
    with pytest.raises(
        PrepareError,
        match=rf"^{path}: 1 {key} value\(s\) appear in more than one row \(rows 2, {rows + 2} \({example}\)\); "
        r"the table must hold one row per",
    ):
        prepare(make_cfg(tree, tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.parquet").exists()


@pytest.mark.parametrize(
    "table, row, column, value, message",
    [
        (
            "hosp/patients.csv.gz",
            1,
            "anchor_age",
            "unknown",
            r"row 3: column 'anchor_age' holds 'unknown', not a number",
        ),
        ("hosp/patients.csv.gz", 0, "anchor_year", "2180a", r"row 2: column 'anchor_year' holds '2180a', not a number"),
        (
            "mimic-cxr-2.0.0-metadata.csv.gz",
            0,
            "subject_id",
            "p10000032",
            r"row 2: column 'subject_id' holds 'p10000032'; an id must be digits",
        ),
        (
            "mimic-cxr-2.0.0-metadata.csv.gz",
            0,
            "StudyTime",
            "",
            r"row 2: StudyDate 21800506 / StudyTime nan unreadable",
        ),
        (
            "mimic-cxr-2.0.0-chexpert.csv.gz",
            2,
            "study_id",
            "",
            r"row 4: column 'study_id' holds ''; an id must be digits",
        ),
        ("ed/edstays.csv.gz", 0, "intime", "soon", r"row 2: column 'intime' holds 'soon', not a date and time"),
        ("ed/triage.csv.gz", 3, "stay_id", "3e7", r"row 5: column 'stay_id' holds '3e7'; an id must be digits"),
    ],
)
def test_unreadable_values_name_file_and_row(tree, tmp_path, monkeypatch, table, row, column, value, message):
    path = next(p for p in (tree["cxr_jpg"] / table, tree["ed"] / table, tree["hosp"] / table) if p.is_file())

    def damage(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame

    edit_table(path, damage)
    no_image_work(monkeypatch)
    with pytest.raises(PrepareError, match=rf"^{path}: {message}"):
        prepare(make_cfg(tree, tmp_path / "out"))


def test_empty_table_is_one_line_through_the_entry_point(tree, tmp_path):
    import subprocess
    import sys

    path = tree["cxr_jpg"] / "mimic-cxr-2.0.0-chexpert.csv.gz"
    with gzip.open(path, "wb"):
        pass  # a valid gzip of nothing
    args = [f"mimic.{k}={v}" for k, v in tree.items()] + [f"output_dir={tmp_path / 'out'}"]
    result = subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.prepare", *args], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"mdfnet_hydra.prepare: error: {path}: is empty (not even a header row); download it again."
    )
    assert "Traceback" not in result.stderr


def test_an_empty_train_or_val_split_is_refused(tree, tmp_path):
    split_csv = tree["cxr_jpg"] / "mimic-cxr-2.0.0-split.csv"
    original = split_csv.read_text()
    split_csv.write_text(original.replace(",validate", ",train"))
    with pytest.raises(
        PrepareError,
        match=rf"^with the split, the splits hold train 5, val 0, test 1 studies; training needs studies in both "
        rf"train and val. The split comes from the split table {split_csv}: check its split column",
    ):
        prepare(make_cfg(tree, tmp_path / "a"))
    assert not (tmp_path / "a" / "manifest.parquet").exists()
    split_csv.write_text(original)  # val holds one study, whose images (PA and AP) are now missing
    for dicom in ("d-pa-3", "d-ap-3"):
        (fake_mimic.study_dir(tree["cxr_jpg"], 10000764, 57375967) / f"{dicom}.jpg").unlink()
    with pytest.raises(
        PrepareError,
        match=r"^after leaving out studies without a readable image \(or an ED stay\), the splits hold train 3, val 0, "
        r"test 1 studies",
    ):
        prepare(make_cfg(tree, tmp_path / "b"))
    assert not (tmp_path / "b" / "manifest.parquet").exists()
    split = {"kind": "random", "seed": 2, "fractions": [0.98, 0.01, 0.01]}  # 6 studies: none drawn for val
    with pytest.raises(PrepareError, match=r"split.kind=random \(split.seed=2, split.fractions=\[0.98, 0.01, 0.01\]\)"):
        prepare(make_cfg(tree, tmp_path / "c", split=split))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"split": {"kind": "random", "fractions": [1.2, -0.1, -0.1]}}, "split.fractions must be three numbers"),
        (
            {"split": {"kind": "random", "fractions": [0.6, 0.4, 0.0]}},
            r"each above 0 and at most 1, .*\[0.6, 0.4, 0.0\]",
        ),
        ({"split": {"seed": -1}}, r"split.seed must be >= 0 \(random seeds are non-negative\), got -1"),
        ({"images": {"size": 0}}, r"images.size must be >= 16 \(pixels of the shorter side, one ViT patch at least\)"),
        ({"images": {"quality": 0}}, r"images.quality must be within \[1, 100\] \(PIL's JPEG quality\), got 0"),
        ({"images": {"quality": 101}}, r"images.quality must be within \[1, 100\]"),
        ({"images": {"workers": -2}}, r"images.workers must be >= 0"),
        ({"link": {"slack_hours": float("nan")}}, r"link.slack_hours must be >= 0 \(hours either side of an ED stay\)"),
        ({"checks": {"min_images_found": 1.5}}, r"checks.min_images_found must be within \[0, 1\]"),
    ],
)
def test_options_out_of_range_are_refused_before_any_table_is_read(tree, tmp_path, monkeypatch, overrides, message):
    def no_reading(*args, **kwargs):
        raise AssertionError("a table was read before the options were checked")

    monkeypatch.setattr("mdfnet_hydra.mimic.build.read_table", no_reading)
    with pytest.raises(PrepareError, match=rf"^invalid configuration: .*{message}"):
        prepare(make_cfg(tree, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_every_bad_option_is_named_in_one_line_through_the_entry_point(tree, tmp_path):
    import subprocess
    import sys

    args = [f"mimic.{k}={v}" for k, v in tree.items()] + [f"output_dir={tmp_path / 'out'}"]
    args += ["images.size=0", "split.kind=random", "split.fractions=[1.2,-0.1,-0.1]"]
    result = subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.prepare", *args], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mdfnet_hydra.prepare: error: invalid configuration: images.size must be >= 16")
    assert "; split.fractions must be three numbers" in line and not (tmp_path / "out").exists()


def test_ids_that_step_outside_the_tree_are_refused_before_any_file_is_written(tree, tmp_path):
    escape = "../" * 5 + "victim"  # images/p10/p10000032/s50414267/<dicom_id>.jpg -> beside output_dir
    source = fake_mimic.study_dir(tree["cxr_jpg"], 10000032, 50414267) / "d-pa-1.jpg"
    shutil.copy(source, (source.parent / f"{escape}.jpg").resolve())  # what the escaping id would read
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"not to be overwritten")
    for table in ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-split.csv"):
        edit_table(tree["cxr_jpg"] / table, lambda f: f.replace({"dicom_id": {"d-pa-1": escape}}))
    out = tmp_path / "out"
    with pytest.raises(
        PrepareError, match=r"metadata.csv.gz: row 2: column 'dicom_id' holds '(\.\./){5}victim'; an id must be"
    ):
        prepare(make_cfg(tree, out))
    assert victim.read_bytes() == b"not to be overwritten"
    assert not (out / "images").exists() or not any((out / "images").rglob("*"))


def test_implausible_triage_values_count_as_missing_in_the_report(prepared):
    out, m, report = prepared
    assert m.loc["d-pa-7", "temperature"] == 986.0  # kept as recorded; training reads it as missing
    train_studies = 3  # d-pa-1 (98.4), d-ap-2 (no ED stay), d-pa-7 (986)
    assert report["clinical_missingness"]["train"]["temperature"] == round(2 / train_studies, 4)
    assert report["implausible_values"]["temperature"] == 1 and report["implausible_values"]["heartrate"] == 0
    markdown = (out / "prepare_report.md").read_text()
    assert "implausible values (outside labels.PLAUSIBLE_RANGES): temperature 1" in markdown
