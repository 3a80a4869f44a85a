"""What the benchmark runs: the training config of a benchmark size and image size, a job opened as
training opens it (job.open_job), and the trainer's own step (step.TrainingStep) over its batches."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from mdfnet_hydra.config import ConfigError, Modality

log = logging.getLogger(__name__)


CONF = Path(str(resources.files("mdfnet_hydra.conf")))  # the top-level conf/ of a checkout, or an install's copy


def bench_config(cfg: DictConfig, image_size: int) -> DictConfig:
    """The training config the benchmark runs: the chosen size's encoders at `image_size`, a
    synthetic dataset of `bench.samples` images of that size, its own cache directory."""
    from mdfnet_hydra.config import TEXT_RUNTIME_KEYS, BenchSize, TextConfig, VisionConfig, load_train_config

    # unresolved, so that data.root follows the sample count and image size set below
    train = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in ("bench", "hydra")}
    run = load_train_config(train)
    b = cfg.bench
    with open_dict(run):
        if b.size == BenchSize.real:
            # the architectures alone, from the schema's defaults (random weights, whatever encoders were
            # chosen); kept from the run's config: what each encoder hands the fusion (tokens, or one
            # pooled vector: the fast path of a stage-1 sweep) and how the text encoder runs
            run.model.vision = OmegaConf.merge(
                OmegaConf.structured(VisionConfig),
                OmegaConf.load(CONF / "model/vision/biomedclip_arch.yaml"),
                {"output": run.model.vision.output},
            )
            shaping = {key: run.model.text[key] for key in (*TEXT_RUNTIME_KEYS, "output", "pooling")}
            run.model.text = OmegaConf.merge(
                OmegaConf.structured(TextConfig),
                OmegaConf.load(CONF / "model/text/modernbert_base_arch.yaml"),
                shaping,
            )
        run.model.vision.image_size = image_size
        if run.model.vision.open_clip_config is not None:
            run.model.vision.open_clip_config.vision_cfg.image_size = image_size
        run.data.synthetic.num_samples = int(b.samples)
        run.data.synthetic.image_size = image_size
        run.data.small_sample = None
        run.trainer.batch_size = int(b.batch_size)
        run.paths.cache_dir = str(Path(str(b.work_dir)) / "cache")
        run.paths.run_dir = str(b.work_dir)
    return run


def text_length(b: DictConfig) -> Optional[int]:
    """Token ids per report, each report made that long from its own ids (a real size's stand-in for
    long reports); None: the data's own reports, padded as training pads them (`bench.text_length=0`,
    or null at tiny size). The two differ beyond the lengths: ModernBERT's global layers attend
    without a mask where no report is padded (on a GPU, SDPA's flash kernel) and with one where any
    is (the memory-efficient kernel), as its sliding-window layers always do."""
    from mdfnet_hydra.config import BenchSize

    if b.text_length is not None:
        return int(b.text_length) or None
    return 256 if b.size == BenchSize.real else None


class Setup:
    """A job opened for `modalities` exactly as training opens it (job.open_job), training split only."""

    def __init__(
        self,
        cfg: DictConfig,
        modalities: list[str],
        runtime,
        length: Optional[int] = None,
        profile_dir: Optional[Path] = None,
    ) -> None:
        from mdfnet_hydra.data.token_cache import TokenIds
        from mdfnet_hydra.job import open_job
        from mdfnet_hydra.runtime import seed_everything

        cfg = cfg.copy()
        cfg.modality.inputs = [Modality(m) for m in modalities]
        self.cfg, self.modalities, self.runtime = cfg, list(modalities), runtime
        self.profile_dir = profile_dir  # measurements also profiled there (bench.profile)
        seed_everything(int(cfg.seed))
        self.job = open_job(cfg, splits=("train",))
        self.root, self.prep, self.train, self.collate = (
            self.job.root,
            self.job.prep,
            self.job.datasets["train"],
            self.job.collator,
        )
        if len(self.train) < int(cfg.trainer.batch_size):  # a loader without one batch would never yield
            raise ConfigError(
                f"bench.samples={cfg.data.synthetic.num_samples} gives {len(self.train)} training samples, fewer "
                f"than one batch of {cfg.trainer.batch_size}: raise bench.samples"
            )
        if length and self.train.token_ids is not None:  # reports as long as real ones, not the synthetic sentences
            self.train.token_ids = TokenIds.from_lists(
                [ids.repeat(-(-int(length) // len(ids)))[: int(length)].tolist() for ids in self.train.token_ids]
            )

    def model(self, frozen: bool):
        model = self.job.build_model().to(self.runtime.device)
        model.set_encoders_frozen(frozen)
        return model.train()

    def compile_plan(self):
        """How the trainer would compile its step (None: eager); the step compiles itself (step.py)."""
        if not self.cfg.trainer.compile:
            return None
        from mdfnet_hydra.compiling import CompilePlan

        return CompilePlan.of(
            self.cfg.trainer.compile_mode, self.cfg.model.text.length_buckets, text="text" in self.modalities
        )

    def loader(self, dataset=None):
        from torch.utils.data import DataLoader

        from mdfnet_hydra.data.loading import loader_settings

        dataset = dataset if dataset is not None else self.train
        return DataLoader(
            dataset,
            batch_size=int(self.cfg.trainer.batch_size),
            shuffle=True,
            drop_last=True,
            collate_fn=self.collate,
            **loader_settings(self.cfg.data, self.runtime, dataset),
        )

    def batches(self, count: int) -> list[dict]:
        """`count` shuffled training batches collated in this process: the batches a step measurement
        replays (no loader workers left prefetching and decoding beside the timed steps)."""
        import itertools

        import torch
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.train,
            batch_size=int(self.cfg.trainer.batch_size),
            shuffle=True,
            drop_last=True,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(int(self.cfg.seed)),
        )
        return list(itertools.islice(loader, count))


def loader_choices(setup: Setup) -> dict[str, Any]:
    """The DataLoader settings the benchmark's image pipeline runs with (chosen from the machine)."""
    from mdfnet_hydra.data.loading import loader_settings

    return {k: v for k, v in loader_settings(setup.cfg.data, setup.runtime, setup.train).items() if k != "generator"}


def train_step(model, optimizer, loss_fn, runtime, trainer_cfg: DictConfig, compile_plan=None) -> Callable[[dict], int]:
    """The trainer's own step (step.TrainingStep: autocast forward, loss, scaled backward, the
    window's gradient sums, clipping, the optimizer step; compiled as the trainer compiles it under
    `compile_plan`) over one batch after another, with the trainer's `trainer.grad_accum`: each call
    is one micro-batch, and every `grad_accum`-th steps the optimizer (and, under DDP, all-reduces).
    Returns the samples each call took; measure whole windows (`whole_windows`)."""
    from mdfnet_hydra.step import TrainingStep, to_device

    step = TrainingStep(
        model,
        optimizer,
        loss_fn,
        runtime,
        accumulation=int(trainer_cfg.grad_accum),
        max_grad_norm=trainer_cfg.max_grad_norm,
        compile_plan=compile_plan,
        compile_loss=bool(trainer_cfg.compile_loss),
        foreach=bool(trainer_cfg.grad_accum_foreach),
    )
    calls = iter(range(10**12))

    def take(batch: dict) -> int:
        batch = to_device(batch, runtime.device)
        step(batch, next(calls))
        return int(batch["targets"].shape[0])

    return take


def whole_windows(calls: int, accumulation: int) -> int:
    """`calls` micro-batches rounded up to whole accumulation windows (each ends in an optimizer step)."""
    return -(-int(calls) // max(1, int(accumulation))) * max(1, int(accumulation))


def optimizer_for(model, cfg: DictConfig, phase: str, runtime=None):
    from mdfnet_hydra.optim import build_optimizer

    fused = runtime is not None and runtime.fused_optimizer
    return build_optimizer(model, cfg.phases[phase], cfg.optimizer, fused=fused)
