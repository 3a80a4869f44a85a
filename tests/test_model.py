"""The model: only the chosen encoders are built; shapes; parameter groups; the spec's sizes."""

from __future__ import annotations

import pytest
import torch

from mdfnet_hydra.config import Modality
from mdfnet_hydra.data.dataset import Collator, load_splits
from mdfnet_hydra.data.preprocessing import Preprocessing
from mdfnet_hydra.models.mdfnet import build_model
from mdfnet_hydra.optim import build_optimizer, build_scheduler

MODALITIES = ["vision", "text", "clinical", "vision_text", "vision_clinical", "text_clinical", "all"]


def build(cfg):
    modalities = [Modality(m).value for m in cfg.modality.inputs]
    root, splits = load_splits(cfg.data, cfg.seed)
    prep = Preprocessing.create(cfg.model, modalities, splits["train"])
    model = build_model(cfg.model, modalities, prep.clinical_dim, prep.tokenizer)
    dataset = prep.dataset(splits["train"], root, cfg.model)
    batch = Collator(prep.pad_id)([dataset[i] for i in range(4)])
    return model, batch, modalities


@pytest.mark.parametrize("modality", MODALITIES)
def test_only_the_needed_encoders_are_built_and_fed(cfg_factory, modality):
    model, batch, modalities = build(cfg_factory(f"modality={modality}"))
    assert sorted(model.encoders.keys()) == sorted(m for m in modalities if m != "clinical")
    assert (model.clinical_encoder is not None) == ("clinical" in modalities)
    assert ("image" in batch) == ("vision" in modalities)
    assert ("input_ids" in batch) == ("text" in modalities)
    assert ("clinical" in batch) == ("clinical" in modalities)
    assert model(batch).shape == (4, 14)


def test_clinical_encoder_has_about_525k_parameters(cfg_factory):
    model, _, _ = build(cfg_factory("modality=clinical"))
    n = sum(p.numel() for p in model.clinical_encoder.parameters())
    assert 500_000 < n < 560_000, n


def test_pooled_outputs_and_concat_fusion_also_work(cfg_factory):
    cfg = cfg_factory(
        "model.vision.output=pooled", "model.text.output=pooled", "model.text.pooling=mean", "model.fusion.kind=concat"
    )
    model, batch, _ = build(cfg)
    assert model(batch).shape == (4, 14)


def test_parameter_groups_carry_the_configured_learning_rates(cfg_factory):
    cfg = cfg_factory("phases.stage2.lr_fusion=3e-4")
    model, _, _ = build(cfg)
    model.set_encoders_frozen(True)
    stage1 = {g["name"]: g["lr"] for g in build_optimizer(model, cfg.phases.stage1, cfg.optimizer).param_groups}
    assert stage1 == {"fusion": 1e-3, "head": 1e-3}, "frozen encoders are not in the optimizer"
    model.set_encoders_frozen(False)
    stage2 = {g["name"]: g["lr"] for g in build_optimizer(model, cfg.phases.stage2, cfg.optimizer).param_groups}
    assert stage2 == {"encoders": 1e-5, "fusion": 3e-4, "head": 1e-4}
    sgd = build_optimizer(model, cfg.phases.stage2, cfg_factory("optimizer=sgd").optimizer)
    assert isinstance(sgd, torch.optim.SGD) and {g["name"]: g["lr"] for g in sgd.param_groups} == stage2


def test_every_parameter_is_in_exactly_one_group(cfg_factory):
    model, _, _ = build(cfg_factory())
    groups = model.parameter_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_warmup_then_cosine_schedule(cfg_factory):
    cfg = cfg_factory()
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, cfg.scheduler, warmup_steps=10, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(cfg.scheduler.warmup_start_factor)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "linear warmup rises"
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine decays"
    assert lrs[60] == pytest.approx(cfg.scheduler.min_lr_ratio + (1 - cfg.scheduler.min_lr_ratio) * 0.5, abs=1e-6)
    assert lrs[-1] == pytest.approx(cfg.scheduler.min_lr_ratio, abs=2e-3)


def test_frozen_encoders_run_without_autograd_and_in_eval_mode(cfg_factory):
    model, batch, _ = build(cfg_factory())
    model.set_encoders_frozen(True)
    model.train()
    assert not any(m.training for m in model.encoders.modules())
    assert model.head.training
    encoded = model.encode(batch)
    assert all(not tokens.requires_grad for tokens, _ in encoded.values())
