"""MIMIC preparation on damaged or unusual inputs: tables that do not belong together, unusual values
and images, the random split's stability, the image workers' lifetime and the output directory."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_prepare import edit_table, make_cfg

import fake_mimic
from conftest import REPO
from mdfnet_hydra.data.manifest import read_manifest
from mdfnet_hydra.mimic.build import prepare
from mdfnet_hydra.mimic.tables import PrepareError

NO_LINKS = {"min_patients_found": 0, "min_ed_linked": 0}  # many_studies' patients have no ED stay or row


@pytest.fixture
def tree(tmp_path):
    return fake_mimic.build(tmp_path / "mimic")


def cli(tree: dict, *overrides: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mdfnet_hydra.prepare", *[f"mimic.{k}={v}" for k, v in tree.items()], *overrides]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, **kwargs)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    return line


# ---------------------------------------------------------------- tables that do not belong together


def test_studies_without_labels_stop_the_run_naming_table_counts_and_option(tree, tmp_path):
    chexpert = tree["cxr_jpg"] / "mimic-cxr-2.0.0-chexpert.csv.gz"
    edit_table(chexpert, lambda f: f[f.study_id != "53189527"])  # 5 of the 6 chosen studies keep a row
    with pytest.raises(
        PrepareError,
        match=rf"^found 5 of 6 chosen studies with a row of the same subject_id in {chexpert} \(83%, fewer than "
        r"checks.min_labels_found=0.9\); expected a row per study of the metadata table: .* or lower "
        r"checks.min_labels_found for a partial download.$",
    ):
        prepare(make_cfg(tree, tmp_path / "a"))
    assert not (tmp_path / "a" / "manifest.parquet").exists()
    report = prepare(make_cfg(tree, tmp_path / "b", checks={"min_labels_found": 0.8}))
    assert report["labels"] == {
        "studies with a chexpert row": 5,
        "without a row (left out)": 1,
        "row under another subject_id (left out)": 0,
    }


def test_a_label_row_of_another_subject_is_counted_and_warned(tree, tmp_path):
    chexpert = tree["cxr_jpg"] / "mimic-cxr-2.0.0-chexpert.csv.gz"
    edit_table(chexpert, lambda f: f.replace({"subject_id": {"10000898": "10009999"}}))
    report = prepare(make_cfg(tree, tmp_path / "out", checks={"min_labels_found": 0.8}))
    assert report["labels"]["row under another subject_id (left out)"] == 1
    (warning,) = [w for w in report["warnings"] if "another subject_id" in w]
    assert warning.startswith(f"1 chosen studies have their row in {chexpert} under another subject_id")
    assert "50771383" not in warning, "ids are listed in the report's problems, not in messages"
    assert report["problems"]["chexpert row under another subject_id (studies left out)"] == [
        "subject 10000898, study 50771383"
    ]
    assert "d-pa-4" not in set(read_manifest(tmp_path / "out" / "manifest.parquet").sample_id)
    markdown = (tmp_path / "out" / "prepare_report.md").read_text()
    assert "row under another subject_id (left out) 1" in markdown and "WARNING: 1 chosen studies" in markdown


def test_images_missing_from_the_split_table_stop_the_run(tree, tmp_path):
    split_csv = tree["cxr_jpg"] / "mimic-cxr-2.0.0-split.csv"
    edit_table(split_csv, lambda f: f[f.dicom_id != "d-pa-7"])
    with pytest.raises(
        PrepareError,
        match=rf"^found 5 of 6 chosen images listed in {split_csv} \(83%, fewer than checks.min_split_found=0.9\)",
    ):
        prepare(make_cfg(tree, tmp_path / "a"))
    report = prepare(make_cfg(tree, tmp_path / "b", checks={"min_split_found": 0}))
    assert report["official_split"] == {"listed": 5, "not listed (left out)": 1}


@pytest.mark.parametrize("damage", ["empty", "other stays"])
def test_triage_without_the_linked_stays_stops_the_run(tree, tmp_path, damage):
    triage = tree["ed"] / "ed" / "triage.csv.gz"
    if damage == "empty":
        edit_table(triage, lambda f: f.iloc[:0])  # the header alone
    else:
        edit_table(triage, lambda f: f.assign(stay_id=f.stay_id.str.replace("3000", "4000")))
    with pytest.raises(
        PrepareError,
        match=rf"^found 0 of 4 ED-linked studies whose stay has a row in {triage} \(0%, fewer than "
        r"checks.min_triage_found=0.5\); expected a row per stay_id of the edstays table",
    ):
        prepare(make_cfg(tree, tmp_path / "a"))
    report = prepare(make_cfg(tree, tmp_path / "b", checks={"min_triage_found": 0}))
    assert report["triage"] == {"linked studies with a triage row": 0, "without": 4}


# ---------------------------------------------------------------- values


def test_gender_words_and_case_are_read_and_unknown_values_fall_back_to_the_ed_stay(tree, tmp_path):
    patients = tree["hosp"] / "hosp" / "patients.csv.gz"
    genders = {"10000032": "female", "10000764": "Male", "10000898": "unknown", "10001122": "m"}
    edit_table(patients, lambda f: f.assign(gender=f.subject_id.map(genders)))
    report = prepare(make_cfg(tree, tmp_path / "out"))
    sex = read_manifest(tmp_path / "out" / "manifest.parquet").set_index("sample_id")["sex"]
    assert sex.to_dict() == {"d-pa-1": "F", "d-ap-2": "F", "d-pa-3": "M", "d-pa-4": "F", "d-pa-7": "M"}
    assert report["sex"] == {"missing": 0, "unrecognised gender values": 1}  # d-pa-4: its ED stay says F
    assert any("gender other than M / F" in w and "'unknown'" in w for w in report["warnings"])


def test_study_time_out_of_range_is_refused(tree, tmp_path):
    metadata = tree["cxr_jpg"] / "mimic-cxr-2.0.0-metadata.csv.gz"
    edit_table(metadata, lambda f: f.replace({"StudyTime": {"213014.531": "129999"}}))
    with pytest.raises(PrepareError, match=rf"^{metadata}: row 2: StudyDate 21800506 / StudyTime 129999.0 unreadable"):
        prepare(make_cfg(tree, tmp_path / "out"))


def test_a_table_both_gzipped_and_plain_is_refused_naming_both(tree, tmp_path):
    gz = tree["cxr_jpg"] / "mimic-cxr-2.0.0-chexpert.csv.gz"
    pd.read_csv(gz).to_csv(gz.with_suffix(""), index=False)
    with pytest.raises(
        PrepareError,
        match=rf"^1 input\(s\) missing or ambiguous: one mimic-cxr-2.0.0-chexpert table, not 2 \(mimic.cxr_jpg: "
        rf"{gz}, {gz.with_suffix('')}; remove all but one\)",
    ):
        prepare(make_cfg(tree, tmp_path / "out"))


# ---------------------------------------------------------------- images


def image_of(tree: dict, subject: int, study: int, dicom: str) -> Path:
    return fake_mimic.study_dir(tree["cxr_jpg"], subject, study) / f"{dicom}.jpg"


def test_wide_images_are_scaled_to_8_bits_and_small_ones_up_to_the_size(tree, tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 250), (300, 1))  # 12 bits stored in 16, as DICOM exports hold them
    Image.fromarray(ramp.astype(np.uint16)).save(image_of(tree, 10000032, 50414267, "d-pa-1"), format="PNG")
    Image.fromarray((ramp / 4095 * 3.5 - 1).astype(np.float32)).save(
        image_of(tree, 10000764, 57375967, "d-pa-3"), format="TIFF"
    )
    Image.fromarray((np.random.default_rng(0).random((50, 40)) * 255).astype(np.uint8)).save(
        image_of(tree, 10000898, 50771383, "d-pa-4"), format="JPEG"
    )
    out = tmp_path / "out"
    report = prepare(make_cfg(tree, out))
    assert report["images"]["unreadable"] == 0
    manifest = read_manifest(out / "manifest.parquet").set_index("sample_id")
    for sample in ("d-pa-1", "d-pa-3"):
        with Image.open(out / manifest.loc[sample, "image_path"]) as image:
            pixels = np.asarray(image, dtype=float)
        assert image.mode == "L" and min(image.size) == 128
        assert pixels[:, :5].mean() < 10 and pixels[:, -5:].mean() > 245, "the ramp spans black to white"
        assert (pixels >= 250).mean() < 0.1, "not clipped to white"
    with Image.open(out / manifest.loc["d-pa-4", "image_path"]) as image:
        assert image.size == (128, 160), "a 40 x 50 image is scaled up to a shorter side of images.size"


def test_an_image_declaring_a_huge_size_is_unreadable_not_fatal(tree, tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.find(b"\xff\xc0")  # the JPEG frame header: height and width follow the precision byte
    data[frame + 5 : frame + 9] = (30000).to_bytes(2, "big") * 2
    image_of(tree, 10000898, 50771383, "d-pa-4").write_bytes(bytes(data))
    report = prepare(make_cfg(tree, tmp_path / "out"))
    (listed,) = report["problems"]["unreadable images (studies left out)"]
    assert "study 50771383" in listed and "DecompressionBombError" in listed


def test_a_study_whose_pa_image_is_lost_takes_its_ap_image(tree, tmp_path):
    image_of(tree, 10000764, 57375967, "d-pa-3").unlink()
    out = tmp_path / "out"
    report = prepare(make_cfg(tree, out))
    manifest = read_manifest(out / "manifest.parquet").set_index("sample_id")
    assert "d-ap-3" in manifest.index and "d-pa-3" not in manifest.index
    assert (out / manifest.loc["d-ap-3", "image_path"]).is_file() and manifest.loc["d-ap-3", "split"] == "val"
    assert report["other_frontal_image_used"] == 1
    assert report["problems"]["missing images (studies left out)"] == [
        f"subject 10001122, study 58937611: no file {image_of(tree, 10001122, 58937611, 'd-missing-6')}"
    ], "only the study without another frontal image is left out"
    assert (
        "other frontal image used (preferred one missing or unreadable): 1 studies"
        in (out / "prepare_report.md").read_text()
    )


# ---------------------------------------------------------------- random split


def test_random_split_of_a_patient_does_not_depend_on_the_other_patients(tmp_path):
    tree = fake_mimic.build(tmp_path / "mimic", fake_mimic.many_studies(30))
    options = {
        "split": {"kind": "random", "seed": 0, "fractions": [0.6, 0.2, 0.2]},
        "checks": NO_LINKS,
        "text": {"sections": []},
    }
    prepare(make_cfg(tree, tmp_path / "all", **options))
    before = read_manifest(tmp_path / "all" / "manifest.parquet").set_index("patient_id")["split"]
    assert set(before) == {"train", "val", "test"}
    removed = before.index[0]
    edit_table(tree["cxr_jpg"] / "mimic-cxr-2.0.0-metadata.csv.gz", lambda f: f[f.subject_id != removed])
    prepare(make_cfg(tree, tmp_path / "one_less", **options))
    after = read_manifest(tmp_path / "one_less" / "manifest.parquet").set_index("patient_id")["split"]
    assert after.to_dict() == before.drop(removed).to_dict()


# ---------------------------------------------------------------- the run record


def test_report_records_the_config_and_manifest_a_failed_rerun_keeps_them(tree, tmp_path):
    out = tmp_path / "out"
    prepare(make_cfg(tree, out))
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["config"]["images"]["size"] == 128 and saved["config"]["mimic"]["ed"] == str(tree["ed"])
    assert saved["manifest_sha256"] == hashlib.sha256((out / "manifest.parquet").read_bytes()).hexdigest()
    edit_table(tree["cxr_jpg"] / "mimic-cxr-2.0.0-chexpert.csv.gz", lambda f: f.iloc[:2])
    with pytest.raises(PrepareError, match="checks.min_labels_found"):
        prepare(make_cfg(tree, out, images={"size": 64}))
    assert json.loads((out / "prepare_report.json").read_text()) == saved


# ---------------------------------------------------------------- the entry point


def test_unusable_output_dir_is_one_line_before_hydra_writes(tree, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = {
        a_file: f"output_dir {a_file} is a file: choose a folder",
        a_file / "out": f"output_dir {a_file / 'out'} is under the file {a_file}: choose a folder",
        tree["ed"]: f"output_dir {tree['ed']} is mimic.ed ({tree['ed']}): the preparation writes",
        tree["cxr_jpg"] / "out": f"output_dir {tree['cxr_jpg'] / 'out'} is inside mimic.cxr_jpg",
    }
    for out, message in cases.items():
        line = one_error_line(cli(tree, f"output_dir={out}"))
        assert line.startswith(f"mdfnet_hydra.prepare: error: {message}"), line
    assert not (tree["ed"] / ".hydra").exists() and not (tree["cxr_jpg"] / "out").exists()


def test_train_hint_can_be_pasted_when_the_path_has_spaces(tree, tmp_path):
    out = tmp_path / "my prepared"
    result = cli(tree, f"output_dir={out}", "images.workers=1", "images.size=32", "text.sections=[]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"python -m mdfnet_hydra.train data=processed 'data.root={out}'" in result.stdout + result.stderr


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass  # ended meanwhile
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes in a container is not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killing_prepare_ends_its_image_workers(tmp_path, how):
    tree = fake_mimic.build(tmp_path / "mimic", fake_mimic.many_studies(150))
    args = [sys.executable, "-m", "mdfnet_hydra.prepare", *[f"mimic.{k}={v}" for k, v in tree.items()]]
    args += [f"output_dir={tmp_path / 'out'}", "images.workers=2", "text.sections=[]"]
    args += [f"checks.{name}=0" for name in NO_LINKS] + ["split.kind=random", "images.size=512"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # a file, not a pipe: workers left behind would hold a pipe open
        process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    deadline, workers = time.monotonic() + 60, []
    try:
        while not workers and process.poll() is None and time.monotonic() < deadline:
            workers = children(process.pid)
            time.sleep(0.01)
        assert workers, "the preparation ended before its image workers started"
        os.kill(process.pid, how)
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers), "an image worker outlived the preparation"
    finally:
        for pid in workers:  # this test's own leftovers, should it fail
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    if how == signal.SIGTERM:
        assert log.read_text().strip().splitlines()[-1] == "mdfnet_hydra.prepare: terminated (SIGTERM)"
