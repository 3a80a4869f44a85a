"""Bad inputs fail early and named (issue 13): damaged images, image paths outside the dataset
root, non-string text, a triage feature never recorded in training, a patient in two splits."""

from __future__ import annotations

import builtins
import logging
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from conftest import run_cli
from mdfnet_hydra.config import ConfigError, DataConfig
from mdfnet_hydra.data import dataset as dataset_module
from mdfnet_hydra.data.clinical import ClinicalNormalizer
from mdfnet_hydra.data.dataset import Collator, MultimodalDataset, load_splits
from mdfnet_hydra.data.manifest import ManifestError, read_manifest, validate_manifest
from mdfnet_hydra.data.preprocessing import Preprocessing
from mdfnet_hydra.data.synthetic import generate
from mdfnet_hydra.labels import CLINICAL_FEATURES
from mdfnet_hydra.tracking import private, public_message, public_traceback


@pytest.fixture
def prepared(tmp_path):
    """A small dataset in the prepared format (what `python -m mdfnet_hydra.prepare` writes)."""
    root = tmp_path / "prepared"
    return root, generate(root, num_samples=80, image_size=16, seed=5)


def data_config(root, **values) -> DataConfig:
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "processed", "root": str(root), **values})


def to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_raw_manifest(frame: pd.DataFrame, root) -> None:
    """Bypass write_manifest's validation, as a hand-made or third-party manifest would."""
    frame.to_parquet(root / "manifest.parquet", index=False)


# ---------------------------------------------------------------- damaged images
def test_truncated_image_names_file_and_sample_mid_epoch(prepared):
    root, frame = prepared
    _, splits = load_splits(data_config(root), seed=0)  # intact at start; damaged mid-run
    train = splits["train"]
    bad = 3
    truncate(root / train.frame.image_path[bad])
    dataset = MultimodalDataset(train, root, image_transform=to_tensor)
    assert dataset[0]["image"].shape == (16, 16)
    sample_id, path = train.frame.sample_id[bad], str(root / train.frame.image_path[bad])
    with pytest.raises(OSError, match=re.escape(path)) as err:
        dataset[bad]
    assert f"sample_id {private(repr(sample_id))}" in str(err.value) and "image file is truncated" in str(err.value)
    assert "data.verify_images=true" in str(err.value)
    # what logs, failure.json and sweep summaries get: neither the file (it names the patient) nor the sample
    public = public_message(err.value)
    assert path not in public and sample_id not in public and "of the train split" in public
    # the name survives a DataLoader worker (how stage 2 and uncached stage 1 read images), the mark too
    loader = DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=Collator())
    with pytest.raises(OSError, match=re.escape(path)) as err:
        for _ in loader:
            pass
    assert path not in public_message(err.value) and path not in public_traceback(err.value)


def test_a_deleted_image_is_named_on_the_console_and_withheld_from_files(prepared):
    """An image deleted after `prepare` with data.verify_images off (the setting for full MIMIC):
    the OS's own error carries the path (it names the patient), raised by `open` and, for the
    feature cache's key, by `os.stat`. What files get (public_*) holds neither path nor sample id,
    also where a DataLoader worker copies the whole traceback into its message."""
    from mdfnet_hydra.data.feature_cache import _rows_digest

    root, frame = prepared
    _, splits = load_splits(data_config(root, verify_images=False), seed=0)
    train = splits["train"]
    bad = 2
    sample_id, path = train.frame.sample_id[bad], str(root / train.frame.image_path[bad])
    os.remove(path)
    dataset = MultimodalDataset(train, root, image_transform=to_tensor)
    failures = []
    for read in (
        lambda: dataset[bad],
        lambda: list(DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=Collator())),
        lambda: _rows_digest(dataset, "vision"),
    ):
        with pytest.raises(OSError) as err:
            read()
        failures.append(err.value)
    for err in failures:
        assert path in str(err) and f"sample_id {private(repr(sample_id))}" in str(err), "the console names it"
        assert "FileNotFoundError" in str(err) and "of the train split" in str(err)
        for public in (public_message(err), public_traceback(err)):
            assert path not in public and train.frame.image_path[bad] not in public and sample_id not in public
            assert "of the train split" in public
    assert "FileNotFoundError" in public_traceback(failures[0]), "the cause stays, without its path"


def test_a_duplicate_sample_id_is_withheld_from_files(prepared):
    root, frame = prepared
    bad = frame.copy()
    bad.loc[5, "sample_id"] = frame.sample_id[4]
    with pytest.raises(ManifestError, match="duplicate sample_id values") as err:
        validate_manifest(bad)
    assert frame.sample_id[4] in str(err.value) and frame.sample_id[4] not in public_message(err.value)


def test_what_files_get_of_an_error_chain_nothing_marked():
    """An image's path carried only by the OS's error (nothing marked) is withheld; a checkpoint's
    stays; an id of one character is withheld where marked, not in every line number; errors held by
    an ExceptionGroup are read too."""
    image = "/mimic/files/p10/p10000032/s50414267/0a1b.jpg"
    try:
        open(image)
    except FileNotFoundError as err:
        assert image in str(err) and image not in public_message(err) and image not in public_traceback(err)
    checkpoint = "/runs/x/stage1/checkpoints/last.pth"
    try:
        open(checkpoint)
    except FileNotFoundError as err:
        assert checkpoint in public_message(err), "not patient data: kept"
    try:
        raise ValueError(f"cannot read image {private('/d/a.png')} (sample_id {private(repr(str(1)))})")
    except ValueError as err:
        short = err
    assert "'1'" not in public_message(short) and "\u2039withheld\u203a" in public_message(short)
    frames = public_traceback(short).split("ValueError:")[0]
    assert re.search(r", line \d+, in test_what_files_get", frames), f"line numbers intact: {frames}"
    group = getattr(builtins, "ExceptionGroup", None)  # Python 3.11 on
    if group is not None:
        grouped = group("two", [FileNotFoundError(2, "No such file or directory", image), ValueError("x")])
        assert image not in public_traceback(grouped)


def test_an_evaluation_that_fails_on_an_image_logs_it_withheld(prepared, caplog, monkeypatch, tmp_path):
    """The end-of-run evaluation logs its failure into the run's log file (it never fails the job):
    an unreadable image there, as in the job's own failure, is named on no file."""
    from mdfnet_hydra.data.dataset import unreadable_image
    from mdfnet_hydra.evaluation import evaluate_quietly
    from mdfnet_hydra.evaluation import report as report_module
    from mdfnet_hydra.evaluation.runs import LeftOutError, leave_out

    root, frame = prepared
    _, splits = load_splits(data_config(root), seed=0)
    test = splits["test"]
    path = root / test.frame.image_path[1]

    def unreadable(*args):
        try:
            open(path / "gone")
        except OSError as err:
            raise unreadable_image(test, 1, path, err) from err

    monkeypatch.setattr(report_module, "evaluate", unreadable)
    with caplog.at_level(logging.WARNING):
        assert evaluate_quietly(tmp_path, tmp_path / "evaluation", None) is None
    assert "evaluation of" in caplog.text and "UnreadableImageError" in caplog.text
    assert str(path) not in caplog.text and test.frame.sample_id[1] not in caplog.text
    left_out = []
    try:
        unreadable()
    except OSError as err:
        try:
            raise LeftOutError(root, f"its data cannot be loaded ({err})") from err
        except LeftOutError as left:
            leave_out(left_out, "run", left)
    assert "its data cannot be loaded" in left_out[0].reason and str(path) not in left_out[0].reason


def test_labels_without_a_defined_auroc_in_val_or_test_are_warned(prepared):
    from mdfnet_hydra.data.dataset import label_warnings
    from mdfnet_hydra.labels import CHEXPERT_LABELS

    root, frame = prepared
    _, splits = load_splits(data_config(root), seed=0)
    assert label_warnings(splits) == []
    one_class = frame.copy()
    one_class.loc[one_class.split == "val", list(CHEXPERT_LABELS)] = 1.0
    one_class.loc[one_class.split == "test", list(CHEXPERT_LABELS)] = np.nan
    write_raw_manifest(one_class, root)
    _, splits = load_splits(data_config(root), seed=0)
    warned = label_warnings(splits)
    assert warned[0].startswith("no label of the val split has both a positive and a negative usable target")
    assert warned[1] == "the test split has no usable label (empty or masked): this run reports no test AUROC"


def test_a_job_whose_image_was_deleted_keeps_it_out_of_its_log(prepared, tmp_path):
    """Through the entry point, stage 1 (the cache key stats every image): one line naming the
    image on the console; `train.log` gets the error and traceback without the path or sample id."""
    root, frame = prepared
    row = int(np.flatnonzero(frame.split == "train")[1])
    os.remove(root / frame.image_path[row])
    result = run_cli(
        "data=processed", f"data.root={root}", "data.verify_images=false", f"paths.root={tmp_path}", "debug=fast"
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mdfnet_hydra.train: error: cannot read image ") and frame.image_path[row] in last
    (log,) = (tmp_path / "runs").glob("*/*/logs/train.log")
    text = log.read_text()
    assert "cannot read image \u2039withheld\u203a" in text and "FileNotFoundError" in text
    assert frame.image_path[row] not in text and frame.sample_id[row] not in text


def test_verification_lists_every_unreadable_image(prepared, monkeypatch):
    root, frame = prepared
    truncate(root / frame.image_path[2])
    (root / frame.image_path[5]).write_bytes(b"not an image")
    (root / frame.image_path[7]).unlink()
    with pytest.raises(OSError) as err:
        load_splits(data_config(root), seed=0)  # auto: a small prepared dataset is checked
    message = str(err.value)
    assert message.startswith("3 of the 80 images of ")
    for row in (2, 5, 7):
        sample, path = frame.sample_id[row], root / frame.image_path[row]
        assert f"row {row}, sample_id {private(repr(sample))}: {private(str(path))}" in message
        assert str(root / frame.image_path[row]) not in public_message(err.value)
    assert "image file is truncated" in message and "data.verify_images=false" in message
    assert not list(root.glob(".*verified*.json")), "a failed check is not recorded"
    monkeypatch.setattr(dataset_module, "SHOWN_FAILURES", 2)
    with pytest.raises(OSError, match=r"\.\.\. and 1 more"):
        load_splits(data_config(root), seed=0)


def test_verification_runs_once_until_a_file_changes(prepared, monkeypatch):
    root, frame = prepared
    decoded = []
    original = dataset_module.decode_error
    monkeypatch.setattr(dataset_module, "decode_error", lambda path: decoded.append(path) or original(path))
    load_splits(data_config(root), seed=0)
    assert len(decoded) == 80
    assert len(list(root.glob(".manifest.parquet.images-verified.json"))) == 1
    load_splits(data_config(root), seed=0)
    assert len(decoded) == 80, "recorded pass: not decoded again"
    image = root / frame.image_path[9]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_splits(data_config(root), seed=0)
    assert len(decoded) == 160, "an image changed: checked again"


def test_verify_images_modes(prepared, cfg_factory, monkeypatch):
    root, frame = prepared
    truncate(root / frame.image_path[0])
    load_splits(data_config(root, verify_images=False), seed=0)
    monkeypatch.setattr(dataset_module, "AUTO_VERIFY_MAX_IMAGES", 79)
    load_splits(data_config(root), seed=0)  # auto: too many images to decode at start
    with pytest.raises(OSError, match="1 of the 80 images"):
        load_splits(data_config(root, verify_images=True), seed=0)
    for value, expected in (("true", True), ("false", False), ("auto", False)):
        data = cfg_factory("data=processed", f"data.root={root}", f"data.verify_images={value}").data
        assert dataset_module.wants_image_check(data, 80) is expected
    assert cfg_factory("data=processed", f"data.root={root}").data.verify_images == "auto"
    assert dataset_module.wants_image_check(cfg_factory().data, 10) is False, (
        "auto never checks the generated synthetic data"
    )
    with pytest.raises(ConfigError, match="data.verify_images must be auto, true or false, got 'yes'"):
        dataset_module.wants_image_check(data_config(root, verify_images="yes"), 10)


# ---------------------------------------------------------------- manifest values
@pytest.mark.parametrize("bad_path", ["../outside.png", "/etc/passwd", "images/../../x.png", "C:\\x.png", "..\\x.png"])
def test_image_paths_outside_the_root_are_refused(prepared, bad_path):
    root, frame = prepared
    bad = frame.copy()
    bad.loc[[4, 11], "image_path"] = bad_path
    write_raw_manifest(bad, root)
    with pytest.raises(
        ManifestError, match=r"column 'image_path' holds absolute or '\.\.' paths at rows \[4, 11\]"
    ) as err:
        read_manifest(root / "manifest.parquet")
    assert repr(bad_path) in str(err.value) and repr(bad_path) not in public_message(err.value)
    ok = frame.copy()
    ok.loc[4, "image_path"] = "images/syn..000004.png"  # dots in a name are not a step up
    validate_manifest(ok)
    empty = frame.copy()
    empty.loc[6, "image_path"] = None
    with pytest.raises(ManifestError, match=r"'image_path' is empty or not a string at rows \[6\]"):
        validate_manifest(empty)


def test_null_text_is_empty_and_trains_the_tokenizer(prepared, cfg_factory):
    root, frame = prepared
    train_rows = frame.index[frame.split == "train"][:3]
    write_raw_manifest(frame.assign(text=frame.text.where(~frame.index.isin(train_rows), None)), root)
    _, splits = load_splits(data_config(root), seed=0)
    prep = Preprocessing.create(cfg_factory().model, ["text"], splits["train"])  # trains the tokenizer
    assert prep.tokenizer("")["input_ids"], "empty text still gets [CLS] [SEP]"
    read = read_manifest(root / "manifest.parquet")
    assert read.loc[train_rows, "text"].tolist() == ["", "", ""]


def test_text_that_is_not_a_string_is_refused(prepared):
    root, frame = prepared
    bad = frame.astype({"text": object})
    bad.at[2, "text"] = 17.5
    bad.at[8, "text"] = ["a", "list"]
    with pytest.raises(
        ManifestError, match=r"column 'text' must hold strings .* \['float', 'list'\] at rows \[2, 8\]"
    ) as err:
        validate_manifest(bad)
    assert "['a', 'list']" in str(err.value) and "['a', 'list']" not in public_message(err.value), "text withheld"
    write_raw_manifest(frame.assign(text=np.arange(len(frame))), root)
    with pytest.raises(ManifestError, match=r"'text'.*\['int'\] at rows \[0, 1, 2\] \(80 in all\)"):
        read_manifest(root / "manifest.parquet")


# ---------------------------------------------------------------- triage features
def test_feature_missing_in_every_training_row_is_treated_as_missing(prepared, caplog, tmp_path):
    root, frame = prepared
    write_raw_manifest(frame.assign(pain=frame.pain.where(frame.split != "train", np.nan)), root)
    _, splits = load_splits(data_config(root), seed=0)
    val = splits["val"].frame.assign(pain=8.0)
    with caplog.at_level(logging.WARNING, logger="mdfnet_hydra.data.clinical"):
        prep = Preprocessing.create(None, ["clinical"], splits["train"])
    assert "triage feature 'pain' is missing" in caplog.text
    assert sum("triage feature" in r.message for r in caplog.records) == 1, "only the never-recorded feature"
    pain, n = CLINICAL_FEATURES.index("pain"), len(CLINICAL_FEATURES)
    x = prep.clinical.transform(val)
    assert np.all(x[:, pain] == 0.0) and np.all(x[:, n + pain] == 1.0), "as in training: missing"
    assert np.abs(x[:, :n]).max() < 10, "no unscaled values"
    seen_in_training = prep.clinical.transform(splits["train"].frame)[:, [pain, n + pain]]
    assert np.all(seen_in_training == [0.0, 1.0])
    # restored from a checkpoint: the same width and the same transform
    torch.save({"preprocessing": prep.state()}, tmp_path / "ckpt.pth")
    state = torch.load(tmp_path / "ckpt.pth", weights_only=True)["preprocessing"]
    restored = Preprocessing.create(None, ["clinical"], splits["train"], state=state)
    assert restored.clinical_dim == prep.clinical_dim == 2 * n
    assert np.array_equal(restored.clinical.transform(val), x)


def test_checkpoints_without_the_unrecorded_mask_keep_their_behaviour(prepared):
    _, frame = prepared
    norm = ClinicalNormalizer.fit(frame[frame.split == "train"])
    old_state = {k: v for k, v in norm.state_dict().items() if k != "unrecorded"}
    restored = ClinicalNormalizer.from_state_dict(old_state)
    assert np.array_equal(restored.transform(frame), norm.transform(frame))


# ---------------------------------------------------------------- splits
def test_patient_in_two_splits_is_named_with_rows(prepared):
    _, frame = prepared
    counts = frame.patient_id.value_counts()
    patient = counts[counts > 1].index[0]
    rows = frame.index[frame.patient_id == patient].tolist()
    leak = frame.copy()
    moved_to = "test" if leak.loc[rows[1], "split"] != "test" else "train"
    leak.loc[rows[0], "split"] = moved_to
    stays = leak.loc[rows[1], "split"]
    with pytest.raises(ManifestError) as err:
        validate_manifest(leak, source="m.parquet")
    message = str(err.value)
    assert message.startswith("m.parquet: 1 patients appear in more than one split, e.g. ")
    assert f"patient_id '{patient}'" in message and f"'{patient}'" not in public_message(err.value)
    assert f"{moved_to} rows [{rows[0]}]" in message
    assert f"{stays} rows {[r for r in rows if leak.loc[r, 'split'] == stays]}" in message


def test_an_empty_val_split_ends_training_in_one_line(prepared, tmp_path):
    """A user error like the other manifest errors: one line, not a traceback; the run directory
    keeps only its records and the log that says why (the job had started), as for a missing manifest."""
    root, frame = prepared
    write_raw_manifest(frame.assign(split=frame.split.replace("val", "test")), root)
    sizes = f"train {(frame.split == 'train').sum()}, val 0, test {(frame.split != 'train').sum()}"
    message = f"{root / 'manifest.parquet'}: the train and val splits must not be empty (rows: {sizes})"
    result = run_cli("data=processed", f"data.root={root}", f"paths.root={tmp_path}", "debug=fast")
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"mdfnet_hydra.train: error: {message}"
    assert "Traceback" not in result.stderr
    (run,) = (tmp_path / "runs").glob("*/*")
    assert {p.name for p in run.iterdir()} == {".hydra", ".mdfnet", "logs"}, "nothing trained or written"
    assert message in (run / "logs" / "train.log").read_text()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_without_one_usable_label_is_refused(prepared, split):
    """Every label empty (masked by data.labels.blank=mask, the default) in the training split would
    train on nothing (loss 0, exit 0); in the validation split nothing selects checkpoints."""
    from mdfnet_hydra.labels import CHEXPERT_LABELS

    root, frame = prepared
    labels = list(CHEXPERT_LABELS)
    blanked = frame.copy()
    blanked.loc[blanked.split == split, labels] = np.nan
    write_raw_manifest(blanked, root)
    rows = int((frame.split == split).sum())
    with pytest.raises(
        ManifestError, match=rf"the {split} split has no usable label: every CheXpert label of its {rows} rows"
    ):
        load_splits(data_config(root), seed=0)
    load_splits(data_config(root, labels={"blank": "zeros"}), seed=0)  # blanks read as negatives: labels


def test_labels_that_cannot_train_and_an_empty_test_split_are_warned_in_the_log_and_summary(prepared, tmp_path):
    """A label without one usable training target still gets a validation AUROC that counts in the
    mean, and a run without test rows reports no test metrics: both said at start and in the summary."""
    root, frame = prepared
    edited = frame.copy()
    edited.loc[edited.split == "train", ["Edema", "Pneumonia"]] = np.nan
    edited["split"] = edited.split.replace("test", "val")
    write_raw_manifest(edited, root)
    result = run_cli("data=processed", f"data.root={root}", f"paths.root={tmp_path}", "debug=fast", "stage=stage1")
    assert result.returncode == 0, result.stderr[-3000:]
    untrained = "2 label(s) have no usable target in the train split (empty or masked): Edema, Pneumonia;"
    (log,) = (tmp_path / "runs").glob("*/*/logs/train.log")
    text = log.read_text()
    for warning in (untrained, "the test split is empty: this run reports no test metrics"):
        assert text.count(warning) == 2, f"at start and in the summary: {warning}"


@pytest.mark.parametrize("missing", [None, "", "  "])
def test_a_row_without_its_patient_is_refused_naming_rows(prepared, missing):
    root, frame = prepared
    write_raw_manifest(
        frame.astype({"patient_id": object}).assign(
            patient_id=frame.patient_id.where(~frame.index.isin([3, 9]), missing)
        ),
        root,
    )
    with pytest.raises(ManifestError, match=r"manifest.parquet: column 'patient_id' is null or empty at rows \[3, 9\]"):
        read_manifest(root / "manifest.parquet")


# ---------------------------------------------------------------- numeric columns stored as strings
def test_a_word_in_a_numeric_column_is_refused_and_blanks_stay_missing(prepared):
    root, frame = prepared
    text = frame.astype({"temperature": object})
    text["temperature"] = [str(v) for v in frame.temperature]
    text.loc[[1, 5], "temperature"] = ""  # missing
    text.loc[7, "temperature"] = "hot"
    write_raw_manifest(text, root)
    with pytest.raises(
        ManifestError,
        match=r"column 'temperature' must hold numbers \(empty if missing\) but holds "
        r"‹\['hot'\]› at rows \[7\]",
    ) as err:
        read_manifest(root / "manifest.parquet")
    assert "hot" not in public_message(err.value), "a cell's value is withheld from files"
    text.loc[7, "temperature"] = "98.6"
    write_raw_manifest(text, root)
    read = read_manifest(root / "manifest.parquet")
    assert read.temperature.dtype == np.float64 and read.temperature[[1, 5]].isna().all()
    assert read.temperature[7] == 98.6


def test_blank_cells_of_a_string_label_column_are_empty(prepared):
    root, frame = prepared
    labels = frame.astype({"Edema": object})
    labels["Edema"] = ["" if np.isnan(v) else f"{v:g}" for v in frame.Edema]
    labels.loc[[2, 4], "Edema"] = ""
    write_raw_manifest(labels, root)
    read = read_manifest(root / "manifest.parquet")
    assert read.Edema.dtype == np.float64 and read.Edema[[2, 4]].isna().all()
    assert read.Edema.equals(frame.Edema.where(~frame.index.isin([2, 4])).astype(np.float64))
    labels.loc[6, "Edema"] = "x"
    write_raw_manifest(labels, root)
    with pytest.raises(
        ManifestError,
        match=r"label column 'Edema' holds values other than 1, 0, -1 or empty "
        r"at rows \[6\]: ‹\['x'\]›$",
    ):
        read_manifest(root / "manifest.parquet")
