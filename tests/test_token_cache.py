"""Token ids stored once and shared: the same ids the tokenizer gives, reused without tokenising
again, a new key for any change that changes the ids, and training identical with and without."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_cfg
from mdfnet_hydra.data import token_cache
from mdfnet_hydra.data.token_cache import TokenIds, token_ids, token_key
from mdfnet_hydra.models.text import train_wordpiece
from mdfnet_hydra.pipeline import run

TEXTS = [
    "Mild cardiomegaly. No focal consolidation.",
    "",
    "Small left pleural effusion with adjacent atelectasis; no pneumothorax. " * 6,
    "Support devices in place: endotracheal tube 4 cm above the carina.",
    "Lungs are clear.",
] * 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(TEXTS, 200)


def test_cached_ids_are_the_tokenizers_ids_and_reused_without_tokenising(tokenizer, tmp_path, monkeypatch):
    expected = tokenizer(TEXTS, truncation=True, max_length=24)["input_ids"]
    built = token_ids(tokenizer, TEXTS, 24, tmp_path, "train")
    assert [row.tolist() for row in built] == expected
    assert all(row.dtype == torch.long for row in built)
    assert max(len(r) for r in expected) == 24 and built.lengths.tolist() == [len(r) for r in expected]

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again although the cache holds these ids")

    monkeypatch.setattr(token_cache, "tokenize", no_tokenising)
    reused = token_ids(tokenizer, TEXTS, 24, tmp_path, "train")
    assert reused.directory == built.directory and [r.tolist() for r in reused] == expected
    assert isinstance(reused._flat, np.memmap), "read memory-mapped, not loaded"
    assert [p.name for p in (tmp_path / "tokens").iterdir() if p.is_dir()] == [built.directory.name]


def test_ids_travel_to_dataloader_workers_as_a_reopened_map(tokenizer, tmp_path):
    ids = token_ids(tokenizer, TEXTS, 24, tmp_path)
    payload = pickle.dumps(ids)
    assert len(payload) < ids.lengths.sum() * 4, "the flat array is not copied into the pickle"
    copy = pickle.loads(payload)
    assert isinstance(copy._flat, np.memmap) and [r.tolist() for r in copy] == [r.tolist() for r in ids]
    in_memory = TokenIds.from_lists([[1, 2, 3], [], [7]])
    assert [r.tolist() for r in pickle.loads(pickle.dumps(in_memory))] == [[1, 2, 3], [], [7]]
    assert in_memory[-1].tolist() == [7]
    with pytest.raises(IndexError):
        in_memory[3]


def test_any_change_to_the_ids_inputs_changes_the_key(tokenizer):
    original = token_key(tokenizer, TEXTS, 24)
    assert token_key(train_wordpiece(TEXTS, 200), TEXTS, 24) == original, "same tokenizer, same key"
    assert token_key(tokenizer, TEXTS, 16) != original, "max_length"
    edited = [*TEXTS[:-1], TEXTS[-1] + " Unchanged."]
    assert token_key(tokenizer, edited, 24) != original, "one report's text"
    assert token_key(tokenizer, TEXTS[:-1], 24) != original, "one row fewer"
    assert token_key(train_wordpiece(TEXTS[:3], 200), TEXTS, 24) != original, "another vocabulary"
    left = train_wordpiece(TEXTS, 200)
    left.truncation_side = "left"
    assert token_key(left, TEXTS, 24) != original, "truncation side"


def _train(tmp_path: Path, name: str, output_root: Path, *overrides: str) -> dict:
    cfg = make_cfg(
        [
            "debug=fast",
            "stage=stage1",
            "modality=text",
            "data.feature_cache=false",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
        tmp_path / name,
        output_root,
    )
    summary = run(cfg)["stages"]["stage1"]
    return {**summary, "log": (tmp_path / name / "logs" / "train.log").read_text()}


def test_training_from_cached_ids_matches_tokenising_in_memory(tmp_path, output_root):
    in_memory = _train(tmp_path, "memory", output_root, "data.token_cache=false")
    assert "token ids" not in in_memory["log"] and not (tmp_path / "cache" / "tokens").exists()
    first = _train(tmp_path, "first", output_root)
    second = _train(tmp_path, "second", output_root)
    assert first["log"].count(": built in") == 3 and second["log"].count(": reused in") == 3, (
        "train/val/test built once"
    )
    for result in (first, second):
        assert result["val"]["auroc_mean"] == in_memory["val"]["auroc_mean"]
        assert result["test"]["loss"] == in_memory["test"]["loss"]
