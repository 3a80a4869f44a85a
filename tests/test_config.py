"""Composition: every option of every group composes; mistakes fail at start with a clear message."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import config_options, run_cli
from mdfnet_hydra.config import ConfigError, Modality, StageName, validate_config

GROUPS = [
    "data",
    "modality",
    "model",
    "model/vision",
    "model/text",
    "stage",
    "phases",
    "loss",
    "optimizer",
    "scheduler",
    "trainer",
    "evaluation",
    "paths",
    "debug",
    "experiment",
    "hparams",
    "hparams/space",
]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(cfg_factory, group):
    options = config_options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        extra = ["data.root=/some/prepared/dir"] if (group, option) == ("data", "processed") else []
        if group == "hparams/space":
            extra = ["hparams=bayesian"]
        cfg = cfg_factory(*extra, f"{group}={option}")
        OmegaConf.to_container(cfg.model, resolve=True)  # every interpolation resolves
        if group in ("modality", "stage", "data", "optimizer"):
            node = cfg[group] if group != "data" else cfg.data
            assert node.name == option


def test_modality_group_is_the_seven_combinations(cfg_factory):
    expected = {
        "vision": ["vision"],
        "text": ["text"],
        "clinical": ["clinical"],
        "vision_text": ["vision", "text"],
        "vision_clinical": ["vision", "clinical"],
        "text_clinical": ["text", "clinical"],
        "all": ["vision", "text", "clinical"],
    }
    assert set(config_options("modality")) == set(expected)
    for name, inputs in expected.items():
        cfg = cfg_factory(f"modality={name}")
        assert [Modality(m).value for m in cfg.modality.inputs] == inputs


def test_defaults_are_the_spec(cfg_factory):
    cfg = cfg_factory("phases=spec")
    s1, s2 = cfg.phases.stage1, cfg.phases.stage2
    assert (s1.epochs, s1.warmup_epochs, s1.lr, s1.freeze_encoders) == (15, 3, 1e-3, True)
    assert (s2.epochs, s2.warmup_epochs, s2.lr_encoders, s2.lr, s2.freeze_encoders) == (30, 3, 1e-5, 1e-4, False)
    assert s2.early_stopping_patience == 5
    assert (cfg.trainer.batch_size, cfg.trainer.grad_accum, cfg.optimizer.weight_decay) == (16, 2, 1e-4)
    assert (cfg.model.fusion.dropout, cfg.model.head.dropout1, cfg.model.head.dropout2) == (0.3, 0.3, 0.2)
    from mdfnet_hydra.losses import MultiLabelLoss

    loss = MultiLabelLoss(cfg.loss)
    assert (loss.bce_weight, loss.alpha, loss.gamma) == (0.7, 0.25, 2.0)
    assert loss.focal_weight == pytest.approx(0.3)
    assert [StageName(s).value for s in cfg.stage.run] == ["stage1", "stage2"]
    assert cfg.modality.name == "all" and cfg.data.name == "synthetic"


def test_synthetic_data_shortens_epochs_but_processed_data_uses_the_spec(cfg_factory):
    synthetic = cfg_factory()
    processed = cfg_factory("data=processed", "data.root=/prepared")
    assert synthetic.phases.stage1.epochs < 15 and synthetic.phases.stage2.epochs < 30
    assert synthetic.phases.stage1.lr == 1e-3 and synthetic.phases.stage2.lr_encoders == 1e-5
    assert (processed.phases.stage1.epochs, processed.phases.stage2.epochs) == (15, 30)


def test_processed_data_without_root_fails_at_start(cfg_factory):
    with pytest.raises(ConfigError, match=r"data=processed needs data.root"):
        validate_config(cfg_factory("data=processed"))


def test_appended_unknown_key_fails_validation(cfg_factory):
    with pytest.raises(ConfigError, match="trainer"):
        validate_config(cfg_factory("+trainer.gradient_acumulation=4"))


def test_unknown_rare_label_fails_validation(cfg_factory):
    with pytest.raises(ConfigError, match="Pleural Otter"):
        validate_config(cfg_factory("trainer.checkpoint.rare_labels=[Pleural Otter]"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.synthetic.image_size=8"], "data.synthetic.image_size must be >= 16 pixels (one ViT patch), got 8"),
        (["model.vision.image_size=0"], "model.vision.image_size must be >= 16 pixels (one ViT patch), got 0"),
        (["model.text.length_buckets=[16,1024]"], "lengths above model.text.max_length (128): [1024]"),
    ],
)
def test_shapes_no_job_can_use_fail_validation(cfg_factory, overrides, message):
    """An image smaller than one ViT patch (a traceback from PIL, a run directory left behind,
    before), and a length bucket past the longest report (every batch padded to it)."""
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg_factory(*overrides))
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("modality=vision_txt", "Could not find 'modality/vision_txt'"),
        ("optimizer.lrr=0.1", "Could not override 'optimizer.lrr'"),
        ("modality.inputs=[vision,txt]", "txt"),
        ("loss=huber", "Could not find 'loss/huber'"),
        ("trainer.batch_size=sixteen", "batch_size"),
        ("evaluation.threshold_rule=yoden", "threshold_rule"),
    ],
)
def test_cli_rejects_mistakes_before_any_work(tmp_path, override, message):
    result = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}", f"paths.root={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "data").exists(), "nothing may be generated or trained before the config is valid"


@pytest.mark.parametrize("preset", ["experiment=baselines", "hparams=random"])
def test_a_sweep_preset_without_multirun_stops_before_any_directory(tmp_path, preset):
    result = run_cli(preset, "modality=clinical", "debug=fast", f"paths.root={tmp_path}", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"mdfnet_hydra.train: error: {preset} is a sweep (several jobs) and runs only "
        f"with --multirun: python -m mdfnet_hydra.train --multirun {preset} ..."
    ), result.stderr
    assert not list(tmp_path.iterdir()), "no run directory, no data, no training"


def test_a_sweep_preset_with_its_own_run_dir_still_refuses_to_train(tmp_path):
    result = run_cli(
        "experiment=ablations",
        "modality=clinical",
        "debug=fast",
        f"paths.root={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert result.returncode != 0
    assert "experiment=ablations is a sweep (several jobs) and runs only with --multirun" in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "stage1").exists()


def test_each_optimizer_has_its_own_schema(cfg_factory):
    sgd = cfg_factory("optimizer=sgd", "optimizer.momentum=0.5")
    assert (sgd.optimizer.name, sgd.optimizer.momentum, "betas" in sgd.optimizer) == ("sgd", 0.5, False)
    with pytest.raises(Exception, match="optimizer.betas"):
        cfg_factory("optimizer=sgd", "optimizer.betas=[0.9,0.99]")
    with pytest.raises(Exception, match="optimizer.momentum"):
        cfg_factory("optimizer=adamw", "optimizer.momentum=0.5")


def test_configs_that_earlier_versions_stored_still_load_and_match(cfg_factory):
    """Run records, checkpoints and study fingerprints written before the optimizer schema split and
    before loss.name went: read without those keys, and the same training as today's config."""
    from mdfnet_hydra.config import load_train_config
    from mdfnet_hydra.identity import outcome_identity

    today = cfg_factory()
    stored = OmegaConf.to_container(today, resolve=True, enum_to_str=True)
    stored["loss"]["name"] = "combined"
    stored["optimizer"].update(momentum=0.9, nesterov=True)  # every optimizer carried every key
    loaded = load_train_config(stored, stored=True)
    assert "name" not in loaded.loss and "momentum" not in loaded.optimizer and loaded.optimizer.eps == 1e-8
    with pytest.raises(Exception, match="not in 'LossConfig'"):
        load_train_config(stored)  # anything but a stored config must fit today's schema
    now = OmegaConf.to_container(today, resolve=True, enum_to_str=True)
    assert outcome_identity(stored) == outcome_identity(now)
    stored["optimizer"]["eps"] = 1e-6  # a setting that is still there still counts
    assert outcome_identity(stored) != outcome_identity(now)


def test_an_optimizer_option_not_built_on_its_schema_is_refused(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match="optimizer.name=sgd on an option built on AdamWConfig: choose optimizer=sgd"):
        validate_config(cfg_factory("optimizer.name=sgd"))
    mine = tmp_path / "conf" / "optimizer"
    mine.mkdir(parents=True)
    (mine / "adamw_plain.yaml").write_text("name: adamw\nweight_decay: 0.01\n")  # without `defaults: [adamw_schema]`
    result = run_cli(
        "optimizer=adamw_plain", "--config-dir", str(tmp_path / "conf"), f"paths.root={tmp_path}", timeout=120
    )
    assert result.returncode == 1
    assert "starts with `defaults: [adamw_schema, _self_]`" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    "overrides, message",
    [
        # trains uphill, or not at all, without an error
        (
            ["phases.stage1.lr=-1e-3"],
            "phases.stage1.lr must be > 0 (the learning rate of the fusion and head), got -0.001",
        ),
        (["phases.stage2.lr=0"], "phases.stage2.lr must be > 0"),
        (["phases.stage2.lr_head=-1"], "phases.stage2.lr_head must be > 0"),
        (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm must be > 0 (the clipping norm, or null: no clipping)"),
        (["scheduler.min_lr_ratio=-1"], "scheduler.min_lr_ratio must be within [0, 1]"),
        (["scheduler.warmup_start_factor=1.5"], "scheduler.warmup_start_factor must be within [0, 1]"),
        (["loss.focal_alpha=2"], "loss.focal_alpha must be <= 1"),
        (["loss.focal_gamma=-1"], "loss.focal_gamma must be >= 0"),
        # NaN fails every comparison
        (["phases.stage1.lr=nan"], "phases.stage1.lr must be > 0 (the learning rate of the fusion and head), got nan"),
        (["loss.bce_weight=nan"], "loss.bce_weight and loss.focal_weight must be finite"),
        (["trainer.threshold=inf"], "trainer.threshold must be within [0, 1]"),
        # failed in torch after the run directory existed
        (["model.fusion.dropout=1.5"], "model.fusion.dropout must be within [0, 1) (a probability), got 1.5"),
        (["model.head.dropout1=-0.1"], "model.head.dropout1 must be within [0, 1)"),
        (["trainer.threshold=1.5"], "trainer.threshold must be within [0, 1]"),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay must be >= 0"),
        (["optimizer.betas=[1.5,0.999]"], "optimizer.betas must be two values within [0, 1), got [1.5, 0.999]"),
        (["optimizer=sgd", "optimizer.momentum=-1"], "optimizer.momentum must be >= 0"),
        (["optimizer=sgd", "optimizer.momentum=0"], "optimizer.nesterov needs optimizer.momentum > 0"),
        (["model.fusion.heads=3"], "model.fusion.dim (256) must be a multiple of model.fusion.heads (3)"),
        (["model.fusion.dim=0"], "model.fusion.dim must be >= 1"),
        (["trainer.global_batch_size=0"], "trainer.global_batch_size must be >= 1"),
        (["data.small_sample=0"], "data.small_sample must be >= 1"),
        # trained nothing and exited 0, or 0 meant 'no limit'
        (["phases.stage1.epochs=0"], "phases.stage1.epochs must be >= 1 (epochs to train), got 0"),
        (["phases.stage2.early_stopping_patience=0"], "phases.stage2.early_stopping_patience must be >= 1"),
        (["trainer.max_time=-5"], "trainer.max_time must be a positive duration (or null: no limit), got '-5'"),
        (["trainer.limit_train_batches=0"], "trainer.limit_train_batches must be >= 1"),
        (["model.text.max_length=0", "model.text.length_buckets=[]"], "model.text.max_length must be >= 3"),
        (["model.text.tokenizer_vocab_size=0"], "model.text.tokenizer_vocab_size must be >= 1"),
        (["phases.stage1.epochs=2", "phases.stage1.warmup_epochs=3"], "phases.stage1.warmup_epochs (3) must be <= "),
        (["trainer.nnodes=2", "trainer.node_rank=2"], "trainer.node_rank (2) must be < trainer.nnodes (2)"),
        # a traceback from torch, late
        (["trainer.device=foo"], "trainer.device must be auto, cpu, cuda or cuda:<index>, got 'foo'"),
        (["evaluation.device=gpu"], "evaluation.device must be auto, cpu, cuda or cuda:<index>, got 'gpu'"),
        (["evaluation.seed=-1"], "evaluation.seed must be >= 0 (the bootstrap's seed), got -1"),
        (["trainer.checkpoint.num_rare=20"], "trainer.checkpoint.num_rare must be <= 14 (the CheXpert labels)"),
        (["model.fusion.kind=concat", "model.fusion.heads=3"], "must be a multiple of model.fusion.heads (3)"),
        (["stage=stage2", "stage.init_from='~/best_mean.pth'"], "stage.init_from=~/best_mean.pth: no such"),
        # a mistyped checkpoint: a traceback after the run directory existed
        (
            ["stage=stage2", "stage.init_from=/nonexistent/best_mean.pth"],
            "stage.init_from=/nonexistent/best_mean.pth: no such",
        ),
    ],
)
def test_values_out_of_range_fail_validation_naming_key_range_and_value(cfg_factory, overrides, message):
    """Each value a fault probe found training silently (gradient ascent, nothing trained, exit 0) or
    failing in torch after the job started, refused at start with the key, its range and the value."""
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg_factory(*overrides))
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.focal_alpha=-1"],  # no class weighting
        ["loss.focal_gamma=0", "loss.focal_alpha=1"],
        ["phases.stage2.lr_encoders=0"],
        ["trainer.max_grad_norm=null", "trainer.limit_train_batches=null", "trainer.max_time=null"],
        ["trainer.checkpoint.every_n_epochs=0", "trainer.checkpoint.keep_last=0"],  # no periodic checkpoints
        [
            "trainer.threshold=0",
            "model.fusion.dropout=0",
            "scheduler.min_lr_ratio=0",
            "scheduler.warmup_start_factor=1",
        ],
        ["phases.stage1.epochs=3", "phases.stage1.warmup_epochs=3"],
        ["trainer.device=cuda:1", "evaluation.device=cpu", "trainer.max_time=90m"],
        ["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false"],
        ["scheduler.warmup_start_factor=0"],  # the first step at learning rate 0
        ["trainer.checkpoint.num_rare=20", "trainer.checkpoint.rare_labels=[Edema]"],  # num_rare unused
        # no attention anywhere (concat fusion, no token encoder): the heads are never used
        ["modality=clinical", "model.fusion.kind=concat", "model.fusion.dim=90"],
    ],
)
def test_the_edges_of_each_range_are_accepted(cfg_factory, overrides):
    validate_config(cfg_factory(*overrides))


def test_every_ranged_key_exists_in_the_schema(cfg_factory):
    """A key renamed in the schema but not in RANGES would go unchecked without a word."""
    from omegaconf import OmegaConf

    from mdfnet_hydra.config import RANGES

    cfg = cfg_factory()
    sgd = cfg_factory("optimizer=sgd")
    for key, *_ in RANGES:
        assert (
            OmegaConf.select(cfg, key, default="absent") != "absent"
            or OmegaConf.select(sgd, key, default="absent") != "absent"
        ), key


def test_a_sweeps_own_process_leaves_the_machine_checks_to_its_trials(cfg_factory):
    """A sweep's process may run on another machine than its trials (a SLURM login node): a file or
    package there only is checked by the trials' jobs, not before the study."""
    cfg = cfg_factory("stage=stage2", "stage.init_from=/on/the/compute/nodes/best_mean.pth")
    validate_config(cfg, host=False)
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        validate_config(cfg)


def test_a_global_batch_the_world_size_cannot_split_is_one_wording_everywhere(cfg_factory):
    """The launcher (nproc_per_node x nnodes, known before any worker starts), torchrun's ranks
    (WORLD_SIZE) and a worker's runtime refuse it with the same words."""
    from mdfnet_hydra.launch import world_size_problems
    from mdfnet_hydra.runtime import Runtime

    expected = "trainer.global_batch_size=10 does not split over 3 workers (world size): use a multiple of 3 (9 or 12)"
    launcher = cfg_factory("trainer.nproc_per_node=3", "trainer.global_batch_size=10")
    assert world_size_problems(launcher, environ={}) == [expected]
    two_nodes = cfg_factory("trainer.nproc_per_node=2", "trainer.nnodes=2", "trainer.global_batch_size=6")
    assert world_size_problems(two_nodes, environ={}) == [
        "trainer.global_batch_size=6 does not split over 4 workers (world size): use a multiple of 4 (4 or 8)"
    ]
    torchrun = cfg_factory("trainer.global_batch_size=10")
    assert world_size_problems(torchrun, environ={"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "3"}) == [expected]
    assert world_size_problems(torchrun, environ={}) == [], "one process takes any global batch"
    import torch

    from mdfnet_hydra.config import Precision

    with pytest.raises(ConfigError) as refused:
        Runtime(device=torch.device("cpu"), precision=Precision.fp32, world_size=3).per_device_batch(torchrun.trainer)
    assert str(refused.value) == f"invalid configuration:\n  - {expected}"
    tiny = cfg_factory("trainer.nproc_per_node=3", "trainer.global_batch_size=2")  # a per-device batch of 0
    assert world_size_problems(tiny, environ={}) == [
        "trainer.global_batch_size=2 does not split over 3 workers (world size): use a multiple of 3 (3)"
    ]
