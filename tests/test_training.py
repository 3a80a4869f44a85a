"""End-to-end training through the real pipeline on a small synthetic dataset."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_cfg, run_cli
from mdfnet_hydra.checkpoint import load_checkpoint
from mdfnet_hydra.config import ConfigError
from mdfnet_hydra.data.dataset import Collator, load_splits
from mdfnet_hydra.data.preprocessing import Preprocessing
from mdfnet_hydra.labels import CHEXPERT_LABELS, tag_name
from mdfnet_hydra.models.mdfnet import build_model
from mdfnet_hydra.pipeline import run
from mdfnet_hydra.runtime import seed_everything
from mdfnet_hydra.trainer import PhaseTrainer, TrainingDiverged

SMALL_RUN = ["debug=fast", "data.small_sample=null", "trainer.limit_val_batches=null", "trainer.limit_train_batches=6"]
CHECKPOINTS = {"best_auroc.pth", "best_mean.pth", "best_rare.pth", "last.pth", "epoch_001.pth", "epoch_002.pth"}


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory, output_root):
    run_dir = tmp_path_factory.mktemp("two_stage")
    cfg = make_cfg([*SMALL_RUN, "phases.stage1.epochs=2", "phases.stage2.epochs=2"], run_dir, output_root)
    objective = run(cfg)["objective"]
    return cfg, run_dir, objective


def test_run_writes_everything_the_spec_names(two_stage):
    _, run_dir, _ = two_stage
    assert (run_dir / "logs" / "train.log").is_file() and (run_dir / "metrics.json").is_file()
    for stage in ("stage1", "stage2"):
        d = run_dir / stage
        assert (d / "config.yaml").is_file() and (d / "logs" / "train.log").is_file()
        assert list((d / "tensorboard").glob("events.out.tfevents.*"))
        assert {p.name for p in (d / "checkpoints").iterdir()} == CHECKPOINTS
        assert (d / "predictions" / "val.npz").is_file() and (d / "predictions" / "test.npz").is_file()
        metrics = json.loads((d / "metrics.json").read_text())
        assert {"val", "test", "best_epoch", "wall_time_s", "selected_checkpoint"} <= metrics.keys()
        assert metrics["val"]["auroc_mean"] is not None and metrics["test"]["auroc_mean"] is not None


def test_objective_is_the_final_validation_mean_auroc(two_stage):
    _, run_dir, objective = two_stage
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert objective == pytest.approx(summary["stages"]["stage2"]["val"]["auroc_mean"])
    assert summary["objective"] == pytest.approx(objective)


@pytest.mark.parametrize("split", ["val", "test"])
def test_saved_metrics_match_sklearn_on_saved_predictions(two_stage, split):
    _, run_dir, _ = two_stage
    pred = np.load(run_dir / "stage2" / "predictions" / f"{split}.npz")
    metrics = json.loads((run_dir / "stage2" / "metrics.json").read_text())[split]
    probs, targets, mask = pred["probs"], pred["targets"], pred["mask"]
    defined = []
    for j, name in enumerate(CHEXPERT_LABELS):
        v = mask[:, j] > 0
        y = targets[v, j]
        if 0 < y.sum() < len(y):
            defined.append(roc_auc_score(y, probs[v, j]))
            assert metrics["auroc"][name] == pytest.approx(defined[-1], abs=1e-6)
        else:
            assert metrics["auroc"][name] is None and name in metrics["undefined_labels"]
    assert metrics["auroc_mean"] == pytest.approx(np.mean(defined), abs=1e-6)
    valid = mask > 0
    assert metrics["f1_micro"] == pytest.approx(f1_score(targets[valid], probs[valid] >= 0.5), abs=1e-6)
    assert list(pred["label_names"]) == list(CHEXPERT_LABELS)


def test_tensorboard_has_the_spec_tags(two_stage):
    _, run_dir, _ = two_stage
    for stage, lr_groups in (("stage1", {"fusion", "head"}), ("stage2", {"encoders", "fusion", "head"})):
        acc = EventAccumulator(str(run_dir / stage / "tensorboard"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        expected = {
            "train/loss_bce",
            "train/loss_focal",
            "train/loss_combined",
            "val/loss",
            "val/auroc_mean",
            "val/auprc_mean",
            "val/f1_macro",
            "val/f1_micro",
            "batch/loss",
            "batch/grad_norm",
            "batch/samples_per_sec",
            "train/data_wait_share",
        } | {f"lr/{g}" for g in lr_groups}
        assert expected <= tags, expected - tags
        per_label = {t for t in tags if t.startswith("val/auroc/")}
        assert per_label and per_label <= {f"val/auroc/{tag_name(n)}" for n in CHEXPERT_LABELS}
        assert [e.step for e in acc.Scalars("val/auroc_mean")] == [1, 2]
        assert "lr/encoders" not in tags or stage == "stage2"


def test_nothing_patient_like_reaches_logs(two_stage, output_root):
    cfg, run_dir, _ = two_stage
    _, splits = load_splits(cfg.data, cfg.seed)
    logs = "\n".join(p.read_text() for p in run_dir.rglob("train.log"))
    frame = splits["val"].frame
    for text, sample, patient in zip(frame.text[:20], frame.sample_id[:20], frame.patient_id[:20]):
        assert text not in logs and sample not in logs and patient not in logs
    acc = EventAccumulator(str(run_dir / "stage2" / "tensorboard"))
    acc.Reload()
    assert not any(re.search(r"syn(p)?-\d", t) for t in acc.Tags()["scalars"])


def _initial_model(cfg):
    modalities = [m.value for m in cfg.modality.inputs]
    seed_everything(cfg.seed)
    _, splits = load_splits(cfg.data, cfg.seed)
    prep = Preprocessing.create(cfg.model, modalities, splits["train"])
    seed_everything(cfg.seed)
    return build_model(cfg.model, modalities, prep.clinical_dim, prep.tokenizer)


def test_stage1_keeps_encoders_bit_identical_and_stage2_changes_them(two_stage):
    cfg, run_dir, _ = two_stage
    init = _initial_model(cfg).state_dict()
    s1 = load_checkpoint(run_dir / "stage1" / "checkpoints" / "last.pth")["model"]
    s2 = load_checkpoint(run_dir / "stage2" / "checkpoints" / "last.pth")["model"]
    encoder_keys = [k for k in init if k.startswith("encoders.")]
    trained_keys = [k for k in init if k.startswith(("fusion.", "head.", "adapters.", "clinical_encoder."))]
    assert encoder_keys and trained_keys
    assert all(torch.equal(init[k], s1[k]) for k in encoder_keys), "stage 1 must not touch the encoders"
    assert any(not torch.equal(init[k], s1[k]) for k in trained_keys), "stage 1 trains fusion and head"
    changed = [k for k in encoder_keys if not torch.equal(s1[k], s2[k]) and s1[k].is_floating_point()]
    assert any(k.startswith("encoders.vision") for k in changed) and any(k.startswith("encoders.text") for k in changed)


def test_checkpoint_reloads_and_reproduces_saved_predictions(two_stage):
    cfg, run_dir, _ = two_stage
    ckpt = torch.load(run_dir / "stage2" / "checkpoints" / "best_mean.pth", weights_only=True)
    modalities = ckpt["modalities"]
    root, splits = load_splits(cfg.data, cfg.seed)
    prep = Preprocessing.create(cfg.model, modalities, splits["train"], state=ckpt["preprocessing"])
    model = build_model(cfg.model, modalities, prep.clinical_dim, prep.tokenizer)
    model.load_state_dict(ckpt["model"])
    model.eval()
    dataset = prep.dataset(splits["val"], root, cfg.model)
    with torch.no_grad():
        probs = torch.sigmoid(model(Collator(prep.pad_id)([dataset[i] for i in range(len(dataset))]))).numpy()
    saved = np.load(run_dir / "stage2" / "predictions" / "val.npz")
    np.testing.assert_allclose(probs, saved["probs"], atol=1e-5)
    assert ckpt["config"]["model"]["fusion"]["dim"] == cfg.model.fusion.dim


@pytest.mark.parametrize(
    "modality", ["vision", "text", "clinical", "vision_text", "vision_clinical", "text_clinical", "all"]
)
def test_every_modality_trains(cfg_factory, tmp_path, modality):
    objective = run(cfg_factory("debug=fast", f"modality={modality}"))["objective"]
    assert math.isfinite(objective) and 0.0 <= objective <= 1.0
    stage2 = json.loads((tmp_path / "run" / "stage2" / "metrics.json").read_text())
    assert stage2["modalities"] == modality.replace("all", "vision_text_clinical").split("_")


@pytest.mark.parametrize("loss, optimizer", [("bce", "sgd"), ("focal", "adamw")])
def test_loss_and_optimizer_choices_train(cfg_factory, loss, optimizer):
    assert math.isfinite(
        run(cfg_factory("debug=fast", "stage=stage1", f"loss={loss}", f"optimizer={optimizer}"))["objective"]
    )


def test_periodic_checkpoints_keep_the_last_three(cfg_factory, tmp_path):
    run(
        cfg_factory(
            "debug=fast",
            "stage=stage1",
            "modality=clinical",
            "phases.stage1.epochs=5",
            "trainer.checkpoint.every_n_epochs=1",
        )
    )
    names = sorted(p.name for p in (tmp_path / "run" / "stage1" / "checkpoints").glob("epoch_*.pth"))
    assert names == ["epoch_003.pth", "epoch_004.pth", "epoch_005.pth"]


def test_stage2_from_a_stage1_checkpoint(two_stage, cfg_factory, tmp_path):
    _, run_dir, _ = two_stage
    best = run_dir / "stage1" / "checkpoints" / "best_mean.pth"
    run(cfg_factory("debug=fast", "stage=stage2", f"stage.init_from={best}"))
    assert not (tmp_path / "run" / "stage1").exists()
    stage2 = json.loads((tmp_path / "run" / "stage2" / "metrics.json").read_text())
    assert stage2["epochs_run"] == 1
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert f"initialising from {best}" in log
    with pytest.raises(ConfigError, match="was trained with modalities"):
        run(
            cfg_factory(
                "debug=fast", "stage=stage2", "modality=vision", f"stage.init_from={best}", run_dir=tmp_path / "other"
            )
        )


def test_interrupted_phase_resumes_to_the_same_weights(cfg_factory, tmp_path, monkeypatch):
    overrides = (
        "debug=fast",
        "stage=stage1",
        "modality=vision_clinical",
        "phases.stage1.epochs=3",
        "phases.stage1.warmup_epochs=1",
    )
    run(cfg_factory(*overrides, run_dir=tmp_path / "straight"))

    original = PhaseTrainer._train_epoch

    def killed_in_epoch_3(self, epoch, *args):
        if epoch == 3:
            raise RuntimeError("worker killed")
        return original(self, epoch, *args)

    monkeypatch.setattr(PhaseTrainer, "_train_epoch", killed_in_epoch_3)
    with pytest.raises(RuntimeError, match="worker killed"):
        run(cfg_factory(*overrides, run_dir=tmp_path / "resumed"))
    monkeypatch.setattr(PhaseTrainer, "_train_epoch", original)
    run(cfg_factory(*overrides, run_dir=tmp_path / "resumed"))

    assert "resumed from" in (tmp_path / "resumed" / "stage1" / "logs" / "train.log").read_text()
    a = load_checkpoint(tmp_path / "straight" / "stage1" / "checkpoints" / "last.pth")
    b = load_checkpoint(tmp_path / "resumed" / "stage1" / "checkpoints" / "last.pth")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)


def test_cli_runs_one_directory_with_table(tmp_path):
    result = run_cli(
        "debug=fast",
        "modality=vision_text",
        f"paths.root={tmp_path}",
        "data.synthetic.num_samples=300",
        "data.synthetic.image_size=32",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").glob("*/*"))
    assert len(runs) == 1 and runs[0].name.endswith("_vision_text_two_stage")
    assert {"stage1", "stage2", ".hydra", "logs", "metrics.json"} <= {p.name for p in runs[0].iterdir()}
    out = result.stdout
    assert "AUROC of stage2's best_mean checkpoint" in out and "Pleural Effusion" in out and "Wrote:" in out
    assert str(runs[0]) in out
    # Hydra instantiates the sweep-summary callback through the project's execution whitelist
    assert "will become an error in Hydra 1.5" not in result.stderr, result.stderr[-2000:]


def test_a_callback_outside_the_execution_whitelist_is_refused(tmp_path):
    result = run_cli(
        "debug=fast", "modality=clinical", f"paths.root={tmp_path}", "+hydra.callbacks.evil._target_=builtins.print"
    )
    assert result.returncode != 0
    assert "Target 'builtins.print' is not in the Hydra execution whitelist" in result.stderr
    assert not (tmp_path / "runs").exists(), "refused before any work"


def test_another_fusion_than_the_init_checkpoints_is_refused_up_front_naming_the_setting(
    two_stage, cfg_factory, tmp_path
):
    """It failed in the phase, after the data, with torch's load_state_dict error (dozens of lines)."""
    _, run_dir, _ = two_stage
    best = run_dir / "stage1" / "checkpoints" / "best_mean.pth"
    with pytest.raises(ConfigError) as refused:
        run(cfg_factory("debug=fast", "stage=stage2", f"stage.init_from={best}", "model.fusion.dim=128"))
    assert str(refused.value) == (
        f"stage.init_from={best} was trained with model.fusion.dim=256 (128 now): its weights do not fit this "
        "model; pass the model settings it was trained with"
    )
    assert not (tmp_path / "run" / "stage2").exists(), "refused before any phase began"
    with pytest.raises(ConfigError) as refused:  # an encoder's own architecture: once its weights are built
        run(
            cfg_factory(
                "debug=fast",
                "stage=stage2",
                f"stage.init_from={best}",
                "model.text.model_config.num_hidden_layers=1",
                run_dir=tmp_path / "other",
            )
        )
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"stage.init_from={best} holds the weights of another model (")
    assert "encoders.text.backbone.layers.1.attn.Wqkv.weight not in this model" in message
    assert "it was trained with model.text.model_config.num_hidden_layers=2 (1 now)" in message


def test_the_logged_learning_rate_of_an_epoch_is_the_one_its_last_step_used(cfg_factory, tmp_path):
    """It was the next epoch's first rate: epoch 1 of a warmup epoch read the peak, the last epoch a
    rate no step used. 2 steps per epoch, 1 warmup epoch of 6 steps: factor 0.01 + 0.99 x step / 2
    during warmup, then a cosine from 1 to 0.01 over steps 2..6."""
    run(
        cfg_factory(
            "debug=fast", "stage=stage1", "modality=clinical", "phases.stage1.epochs=3", "phases.stage1.warmup_epochs=1"
        )
    )
    acc = EventAccumulator(str(tmp_path / "run" / "stage1" / "tensorboard"))
    acc.Reload()
    last_steps = (1, 3, 5)  # each epoch's last step (counted from 0)
    factors = [0.01 + 0.99 * 1 / 2] + [
        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in last_steps[1:]
    ]
    assert [e.step for e in acc.Scalars("lr/fusion")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("lr/fusion")] == pytest.approx([1e-3 * f for f in factors], rel=1e-5)


def test_batches_a_step_window_cannot_use_are_named_at_the_start(cfg_factory, tmp_path):
    """5 batches with trainer.grad_accum=2 train 4: the fifth was never loaded, without a word."""
    run(
        cfg_factory(
            "debug=fast", "stage=stage1", "modality=clinical", "data.small_sample=null", "trainer.limit_train_batches=5"
        )
    )
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    line = (
        "stage1: trains on 4 of 5 batches per epoch (trainer.limit_train_batches=5): each optimizer step takes "
        "trainer.grad_accum=2 batches, leaving 1 out every epoch"
    )
    assert log.count(line) == 1, log
    assert "stage1 epoch 1 step 2/2" in log


def test_phase_start_logs_the_scheduled_peak_learning_rates(cfg_factory, tmp_path):
    """Not the warmup's first rates (1% of the peak), which the optimizer holds at that point."""
    run(
        cfg_factory(
            "debug=fast", "stage=stage2", "modality=clinical", "phases.stage2.epochs=2", "phases.stage2.warmup_epochs=1"
        )
    )
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert (
        "stage2: 2 epochs (warmup 1), trainable encoders, lr fusion 1.0e-04, head 1.0e-04 "
        "(linear warmup from 0.01x over 1 epoch(s), then cosine to 0.01x)"
    ) in log
    assert "1.0e-06" not in log


def test_bf16_autocast_path_trains_on_cpu(cfg_factory):
    assert math.isfinite(
        run(cfg_factory("debug=fast", "stage=stage1", "modality=vision_text", "trainer.precision=bf16"))["objective"]
    )


def test_fp16_on_cpu_trains_with_a_live_gradient_scaler(cfg_factory, tmp_path):
    """fp16 autocast and the scaler run on CPU too: the path an older GPU (V100, T4) takes."""
    cfg = cfg_factory(
        "debug=fast", "stage=stage1", "modality=vision_text", "trainer.precision=fp16", "trainer.device=cpu"
    )
    assert math.isfinite(run(cfg)["objective"])
    scaler = load_checkpoint(tmp_path / "run" / "stage1" / "checkpoints" / "last.pth")["scaler"]
    assert scaler["scale"] > 1.0 and "_growth_tracker" in scaler


def test_gradient_clipping_bounds_the_update(cfg_factory, tmp_path):
    plain_sgd = (
        "debug=fast",
        "stage=stage1",
        "modality=clinical",
        "optimizer=sgd",
        "optimizer.weight_decay=0",
        "optimizer.momentum=0",
        "optimizer.nesterov=false",
    )
    clipped_cfg = cfg_factory(*plain_sgd, "trainer.max_grad_norm=1e-9", run_dir=tmp_path / "clipped")
    run(clipped_cfg)
    run(cfg_factory(*plain_sgd, run_dir=tmp_path / "free"))
    init = _initial_model(clipped_cfg).state_dict()

    def largest_change(name):
        trained = load_checkpoint(tmp_path / name / "stage1" / "checkpoints" / "last.pth")["model"]
        return max((trained[k] - init[k]).abs().max().item() for k in init if k.startswith("head."))

    assert largest_change("clipped") < 1e-9
    assert largest_change("free") > 1e-6


@pytest.mark.slow  # 17 s: two training processes
def test_same_seed_gives_identical_weights_across_processes(tmp_path):
    """Reproducibility a comparison between configurations relies on: two separate runs, same seed."""
    common = (
        "debug=fast",
        "stage=stage1",
        f"paths.root={tmp_path}",
        "data.synthetic.num_samples=300",
        "data.synthetic.image_size=32",
    )
    for name, hashseed in (("a", "1"), ("b", "2")):
        result = run_cli(*common, f"hydra.run.dir={tmp_path / name}", env_extra={"PYTHONHASHSEED": hashseed})
        assert result.returncode == 0, result.stderr[-2000:]
    a = load_checkpoint(tmp_path / "a" / "stage1" / "checkpoints" / "last.pth")
    b = load_checkpoint(tmp_path / "b" / "stage1" / "checkpoints" / "last.pth")
    assert a["preprocessing"]["tokenizer_json"] == b["preprocessing"]["tokenizer_json"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_step_starved_by_its_input_pipeline_says_so(tmp_path, output_root, monkeypatch):
    """Every sample takes 20 ms to load (a slow disk): each epoch logs how much of its training loop
    waited for batches, and past a quarter warns that the input pipeline sets the pace. The same job
    with the loader at full speed waits far less."""
    import time

    from mdfnet_hydra.data.dataset import MultimodalDataset

    def waited(run_dir) -> tuple[int, str]:
        overrides = [
            "debug=fast",
            "stage=stage2",
            "modality=clinical",
            "data.num_workers=0",
            "trainer.limit_train_batches=8",
        ]
        run(make_cfg(overrides, run_dir, output_root))
        log = (run_dir / "logs" / "train.log").read_text()
        (line,) = [line for line in log.splitlines() if "stage2 epoch 1/1 |" in line]
        return int(re.search(r"waiting for data (\d+)%", line).group(1)), log

    fast, _ = waited(tmp_path / "fast")
    load = MultimodalDataset.__getitem__

    def slow(self, index):
        time.sleep(0.02)
        return load(self, index)

    monkeypatch.setattr(MultimodalDataset, "__getitem__", slow)
    run_dir = tmp_path / "slow"
    share, log = waited(run_dir)
    assert share > 25 and share > fast + 20, (share, fast)  # 16 x 20 ms per batch against a tiny clinical step
    (warning,) = [line for line in log.splitlines() if "not the model, sets the pace" in line]
    assert "[WARNING]" in warning and "the input pipeline (in the main process (0 workers))" in warning
    acc = EventAccumulator(str(run_dir / "stage2" / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("train/data_wait_share")[0].value == pytest.approx(share / 100, abs=0.006)


def test_a_diverging_loss_names_its_first_non_finite_step_not_the_logging_step(cfg_factory):
    """The loss is read back every trainer.log_every_n_steps (no host sync per step); the error named
    that logging step (here the epoch's last, 11), up to log_every_n_steps - 1 steps after the NaN."""
    cfg = cfg_factory(
        "debug=fast",
        "modality=clinical",
        "stage=stage1",
        "data.small_sample=null",
        "trainer.limit_train_batches=null",
        "trainer.log_every_n_steps=50",
        "phases.stage1.lr=1e8",
    )
    with pytest.raises(TrainingDiverged) as raised:
        run(cfg)
    found = re.search(r"the loss was first non-finite \(nan\) at epoch 1, step (\d+)/(\d+); try ", str(raised.value))
    assert found and int(found.group(1)) < int(found.group(2)) == 11, str(raised.value)
    assert not list(Path(cfg.paths.run_dir).glob("stage1/checkpoints/*.pth")), "no epoch finished"
