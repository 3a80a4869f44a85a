"""Structured-config schema for every config group.

Hydra merges `conf/**.yaml` on top of these dataclasses (the primary config lists its schema first,
`schema: train`, and an optimizer option its own, `adamw_schema`), so a misspelt key or a value of
the wrong type fails at composition time with the offending key named, instead of an hour into a
job. Each dataclass mirrors the module that consumes it. The defaults are here and only here: a
file of conf/ says what its option changes (tests/test_conf_defaults.py).

This module imports nothing heavy: the entry point registers the schema before torch is loaded.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from mdfnet_hydra.machine import ENV_VAR as MACHINE_ENV_VAR
from mdfnet_hydra.machine import parse_spec as parse_machine_spec


class Modality(str, Enum):
    vision = "vision"
    text = "text"
    clinical = "clinical"


def modality_label(modalities) -> str:
    """The `modality` option that names a set of inputs: `all` for the three, else their names
    joined in order (`vision_text`)."""
    names = [getattr(m, "value", m) for m in modalities]
    return "all" if len(names) == len(Modality) else "_".join(names)


class StageName(str, Enum):
    stage1 = "stage1"
    stage2 = "stage2"


class UncertainPolicy(str, Enum):
    ones = "ones"  # U-Ones: uncertain counts as positive
    zeros = "zeros"  # U-Zeros: uncertain counts as negative
    ignore = "ignore"  # U-Ignore: masked out of loss and metrics


class BlankPolicy(str, Enum):
    mask = "mask"  # "not mentioned" is masked out of loss and metrics
    zeros = "zeros"  # "not mentioned" counts as negative (CheXpert convention)


class CacheDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


class ThresholdRule(str, Enum):
    youden = "youden"  # maximise sensitivity + specificity - 1 on validation
    sensitivity = "sensitivity"  # the highest threshold reaching `target_sensitivity` on validation


class VisionSource(str, Enum):
    config = "config"  # build an open_clip image tower from `open_clip_config`, random weights
    pretrained = "pretrained"  # load `name_or_path` (hf-hub:<id> or local-dir:<dir>)


class TextSource(str, Enum):
    config = "config"  # build from `model_config` with random weights, tokenizer trained on train text
    pretrained = "pretrained"  # AutoModel / AutoTokenizer from a hub id or a local directory


class TokenOutput(str, Enum):
    tokens = "tokens"  # per-token states, pooled by the fusion's learned attention
    pooled = "pooled"  # the encoder's own pooled embedding, one vector


class FusionKind(str, Enum):
    attention = "attention"  # transformer layer over one token per modality
    concat = "concat"  # concatenation + MLP


class OptimizerName(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class SchedulerName(str, Enum):
    warmup_cosine = "warmup_cosine"


class Precision(str, Enum):
    auto = "auto"  # bf16 on CUDA where supported, else fp16 with a grad scaler; fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class TextAttention(str, Enum):
    sdpa = "sdpa"
    eager = "eager"
    flex_attention = "flex_attention"
    flash_attention_2 = "flash_attention_2"


class TextPooling(str, Enum):
    """How `output=pooled` makes one vector of a report's tokens: an Enum, so a typo is Hydra's error."""

    cls = "cls"  # the first ([CLS]) token's state
    mean = "mean"  # the mean of the real tokens' states (padding left out)


class CompileMode(str, Enum):
    """torch.compile's modes (compiling.py maps them to torch's names)."""

    default = "default"
    reduce_overhead = "reduce_overhead"
    max_autotune = "max_autotune"
    max_autotune_no_cudagraphs = "max_autotune_no_cudagraphs"

    @property
    def cuda_graphs(self) -> bool:
        """Whether torch records CUDA graphs in this mode (one per input shape)."""
        return self in (CompileMode.reduce_overhead, CompileMode.max_autotune)


class WorkerStart(str, Enum):
    fork = "fork"
    spawn = "spawn"
    forkserver = "forkserver"


class CheckpointName(str, Enum):
    best_mean = "best_mean"
    best_auroc = "best_auroc"
    best_rare = "best_rare"
    last = "last"


@dataclass
class PathsConfig:
    root: str = "outputs"
    data_dir: str = "outputs/data"
    cache_dir: str = "outputs/cache"  # frozen-encoder feature caches, shared by every job that can use them
    run_dir: str = MISSING


@dataclass
class SyntheticConfig:
    num_samples: int = 4000
    image_size: int = 64
    seed: int = 0


@dataclass
class LabelPolicyConfig:
    uncertain: UncertainPolicy = UncertainPolicy.ignore
    blank: BlankPolicy = BlankPolicy.mask


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    manifest: str = "manifest.parquet"
    # Set for the synthetic dataset: generated into `root` on first use.
    synthetic: Optional[SyntheticConfig] = None
    labels: LabelPolicyConfig = field(default_factory=LabelPolicyConfig)
    # Keep at most this many samples per split (seeded subset): the seed's --use-small-sample.
    small_sample: Optional[int] = None
    # Random training-image transforms (open_clip's train transform: random resized crop 0.9-1.0).
    augment: bool = False
    # Stage 1 (frozen encoders, no augmentation) trains from the encoders' outputs computed once per
    # split (data/feature_cache.py); false recomputes them every step.
    feature_cache: bool = True
    feature_cache_dtype: CacheDtype = CacheDtype.float16
    # Where stage 1 reads the cache: null = auto (on a CUDA device, each split whose arrays fit, with
    # the splits before it, in a quarter of the GPU's memory and half of what is free); true = every
    # cached split copied once into the device's memory (RAM on a CPU), batches gathered there by one
    # index with no loader; false = memory-mapped and read per batch by the DataLoader (the loader
    # settings below apply only then).
    feature_cache_on_device: Optional[bool] = None
    # Token ids stored once per (tokenizer, max length, text) under paths.cache_dir/tokens and shared
    # by every job (data/token_cache.py); false tokenises in memory in every job.
    token_cache: bool = True
    # Decode every image of the manifest once at start and list all that fail (data/dataset.py,
    # check_images): auto = for prepared (non-synthetic) datasets of at most 20,000 images; true;
    # false. A pass is recorded beside the manifest, so later jobs skip it until a file changes.
    verify_images: Any = "auto"  # auto | true | false (checked in data/dataset.py)
    # DataLoader settings; null = chosen from the machine (data/loading.py)
    num_workers: Optional[int] = None
    pin_memory: Optional[bool] = None
    persistent_workers: Optional[bool] = None
    prefetch_factor: Optional[int] = None
    # How worker processes start; null: fork where the OS has it. A DDP rank that torch's elastic
    # agent spawned would otherwise spawn its workers too, each re-importing torch and the encoders.
    worker_start: Optional[WorkerStart] = None


@dataclass
class ModalityConfig:
    name: str = MISSING
    inputs: List[Modality] = MISSING


@dataclass
class VisionConfig:
    name: str = MISSING
    source: VisionSource = VisionSource.config
    name_or_path: Optional[str] = None
    # open_clip model config ({embed_dim, vision_cfg}) for source=config.
    open_clip_config: Optional[Dict[str, Any]] = None
    image_size: int = 224
    mean: List[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: List[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    output: TokenOutput = TokenOutput.tokens


@dataclass
class TextConfig:
    name: str = MISSING
    source: TextSource = TextSource.config
    name_or_path: Optional[str] = None
    # transformers config kwargs (with `model_type`) for source=config.
    model_config: Optional[Dict[str, Any]] = None
    # size of the WordPiece vocabulary trained on the training text (source=config only): at least
    # the 5 special tokens and twice the text's characters (alone and as ## continuations), or refused
    tokenizer_vocab_size: int = 1000
    max_length: int = 128
    # Pad each batch's token ids up to the smallest of these lengths that holds its longest report,
    # so a compiled step (trainer.compile) sees a few fixed shapes and compiles once per bucket; the
    # largest must be max_length. []: pad to the batch's longest (a new shape almost every batch).
    length_buckets: List[int] = field(default_factory=list)
    # transformers' attention kernel: sdpa (PyTorch's fused attention) | eager | flex_attention
    # (compiles a block-sparse kernel for the padding and sliding-window masks) | flash_attention_2
    # (needs the flash-attn package); the same outputs up to rounding
    attention: TextAttention = TextAttention.sdpa
    output: TokenOutput = TokenOutput.tokens
    pooling: TextPooling = TextPooling.cls  # for output=pooled: cls | mean


# TextConfig's settings of how the encoder runs (batch shapes, attention kernel), not what it
# computes beyond rounding: left out of the feature cache's key (and, in identity.py, a run's identity)
TEXT_RUNTIME_KEYS = ("length_buckets", "attention")


@dataclass
class ClinicalEncoderConfig:
    hidden_dims: List[int] = field(default_factory=lambda: [512, 512, 512])
    dropout: float = 0.1


@dataclass
class FusionConfig:
    kind: FusionKind = FusionKind.attention
    dim: int = 256
    heads: int = 4
    layers: int = 1
    dropout: float = 0.3


@dataclass
class HeadConfig:
    hidden_dim: int = 256
    dropout1: float = 0.3
    dropout2: float = 0.2


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    clinical: ClinicalEncoderConfig = field(default_factory=ClinicalEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class StageConfig:
    name: str = MISSING
    run: List[StageName] = MISSING
    # A checkpoint whose weights (and fitted preprocessing) start the first phase of `run`.
    init_from: Optional[str] = None


@dataclass
class PhaseConfig:
    epochs: int = MISSING
    warmup_epochs: int = 0
    freeze_encoders: bool = MISSING
    lr: float = MISSING  # fusion and head, unless lr_fusion / lr_head are set
    lr_fusion: Optional[float] = None
    lr_head: Optional[float] = None
    lr_encoders: float = MISSING  # unused while encoders are frozen
    early_stopping_patience: Optional[int] = None


@dataclass
class PhasesConfig:
    stage1: PhaseConfig = field(default_factory=PhaseConfig)
    stage2: PhaseConfig = field(default_factory=PhaseConfig)


@dataclass
class LossConfig:
    """The optimised loss: bce_weight x BCE + focal_weight x focal. The options of conf/loss/ (combined,
    bce, focal) are weightings of the two terms; the option's name is not a key (it would only label
    weights that an override can change)."""

    bce_weight: float = 0.7
    focal_weight: Optional[float] = None  # None: 1 - bce_weight (so sweeping bce_weight keeps the sum 1)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class OptimizerConfig:
    """What every optimizer option has; each option's own schema (below) adds its settings, and
    conf/optimizer/<name>.yaml starts from it (`defaults: [<name>_schema]`)."""

    name: OptimizerName = MISSING
    weight_decay: float = 1e-4  # on every trained parameter (the spec's single value)


@dataclass
class AdamWConfig(OptimizerConfig):
    name: OptimizerName = OptimizerName.adamw
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SGDConfig(OptimizerConfig):
    """SGD with (Nesterov) momentum; it usually wants learning rates ~10-100x AdamW's."""

    name: OptimizerName = OptimizerName.sgd
    momentum: float = 0.9
    nesterov: bool = True


OPTIMIZER_SCHEMAS = {OptimizerName.adamw: AdamWConfig, OptimizerName.sgd: SGDConfig}
OPTIMIZER_NAMES = {name.value for name in OptimizerName}
SHARED_OPTIMIZER_KEYS = ("betas", "eps", "momentum", "nesterov")  # one schema held them all until the split


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.warmup_cosine
    warmup_start_factor: float = 0.01
    min_lr_ratio: float = 0.01


@dataclass
class CheckpointConfig:
    every_n_epochs: int = 5
    keep_last: int = 3
    # Labels averaged for `best_rare`; empty means the `num_rare` rarest in the training split.
    rare_labels: List[str] = field(default_factory=list)
    num_rare: int = 4
    # Which best checkpoint a two-stage run hands to stage 2 and evaluates at the end.
    select: CheckpointName = CheckpointName.best_mean


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N (data-parallel workers use cuda:<local rank>)
    precision: Precision = Precision.auto
    batch_size: int = 16  # per device (the spec's "16 per GPU")
    # If set, the batch per optimizer micro-step over all devices: per-device = global / world size.
    global_batch_size: Optional[int] = None
    grad_accum: int = 2
    # how a window's gradients add up (step.py): true sums them outside autograd, one multi-tensor add
    # per micro-batch instead of an add per parameter tensor (the same numbers; one more copy of the
    # gradients at a backward's peak); false, autograd's accumulation into .grad (under CUDA graphs
    # the step sums outside autograd either way)
    grad_accum_foreach: bool = True
    # Data parallelism (launch.py): workers per node, nodes, rendezvous, restarts, process-group backend
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_backend: str = "c10d"  # c10d (any node may join) | static (node_rank + rdzv_endpoint of node 0)
    rdzv_endpoint: Optional[str] = None  # host:port of node 0; single node: localhost, free port
    rdzv_id: Optional[str] = None
    max_restarts: int = 2
    backend: Optional[str] = None  # nccl on CUDA, gloo on CPU
    max_grad_norm: Optional[float] = None
    log_every_n_steps: int = 10
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    threshold: float = 0.5  # decision threshold for F1
    eval_test: bool = True
    resume: bool = True  # continue from checkpoints/last.pth when the stage directory has one
    # Wall-time budget of the whole job (all stages): seconds, or "90m", "12h", "1d". Training stops
    # cleanly when it runs out and the job returns the best validation metric reached so far.
    max_time: Optional[str] = None
    # torch.compile the model for the training steps (worth it for long GPU runs; first steps compile;
    # model.text.length_buckets keeps it from recompiling: compiling.py)
    compile: bool = False
    # torch's compile mode: default | reduce_overhead (CUDA graphs) | max_autotune (CUDA graphs too) |
    # max_autotune_no_cudagraphs; with text, the CUDA-graph modes need model.text.length_buckets
    compile_mode: CompileMode = CompileMode.default
    # Under trainer.compile, the loss computes inside the compiled step (one graph with the model: its
    # few dozen small kernels are not launched one by one); false compiles the model alone. Under DDP
    # the loss compiles as a graph of its own after the model's (DDP's forward runs eagerly between).
    compile_loss: bool = True
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


class PrunerName(str, Enum):
    none = "none"
    median = "median"
    asha = "asha"  # Optuna's SuccessiveHalvingPruner
    hyperband = "hyperband"


@dataclass
class PrunerConfig:
    """Optuna pruning of a sweep's trials (pruning.py): each trial reports its validation mean AUROC
    after every epoch, stage 2's epochs following stage 1's on one step axis, and stops (keeping its
    best checkpoint and metrics) when the pruner says it cannot catch up."""

    name: PrunerName = PrunerName.none
    n_startup_trials: int = 5  # median: finished trials before any trial is pruned
    n_warmup_steps: int = 3  # median: epochs every trial runs before it may be pruned
    interval_steps: int = 1  # median: epochs between pruning checks
    min_resource: int = 1  # asha / hyperband: epochs before the first rung
    reduction_factor: int = 3  # asha / hyperband: 1 in reduction_factor trials goes on at each rung
    # hyperband: the epochs of a whole trial (None: the configured epochs of the stages it runs)
    max_resource: Optional[int] = None


@dataclass
class HparamsConfig:
    """Sweep settings the job itself needs; the sweeper's own settings live in hydra.sweeper."""

    name: str = MISSING
    objective: str = "single"  # single: val mean AUROC; multi: (val mean AUROC, val min per-label AUROC)
    n_trials: int = 100  # the study's total: re-running the command runs only the missing trials
    # Trials that fail (exception, NaN loss, out of memory, undefined objective) are recorded and the
    # sweep goes on; more than max_failure_rate x n_trials failures abort it.
    max_failure_rate: float = 0.2
    study_name: str = MISSING
    # The search space in the sweeper's syntax, e.g. {"phases.stage1.lr": "tag(log, interval(5e-4, 2e-3))"}
    space: Dict[str, str] = field(default_factory=dict)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)


@dataclass
class EvaluationConfig:
    """How finished runs are evaluated (`python -m mdfnet_hydra.evaluate`, and at the end of runs)."""

    on_finish: bool = True  # write the evaluation for a finished two-stage run / multirun
    checkpoint: CheckpointName = CheckpointName.best_mean
    threshold_rule: ThresholdRule = ThresholdRule.youden  # per-label thresholds chosen on validation
    target_sensitivity: float = 0.9  # for threshold_rule=sensitivity
    n_bootstrap: int = 1000  # patient-level resamples for the mean-AUROC CI and paired p-value
    seed: int = 0
    figures: bool = True
    max_curves: int = 6  # runs drawn in one ROC / PR / calibration figure
    saliency_per_label: int = 2  # Grad-CAM maps of the vision encoder per label (0: none)
    # Saliency figures show dataset images: made for the synthetic data, for real data only on request.
    saliency_real_data: bool = False
    device: str = "auto"
    batch_size: int = 32
    num_workers: Optional[int] = None  # DataLoader workers for recomputed predictions; null: chosen from the machine


@dataclass
class TrainConfig:
    seed: int = 42
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    modality: ModalityConfig = field(default_factory=ModalityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = MISSING  # one of OPTIMIZER_SCHEMAS, chosen by the optimizer group
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    hparams: Optional[HparamsConfig] = None
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


class BenchSize(str, Enum):
    tiny = "tiny"  # the offline default encoders
    real = "real"  # BiomedCLIP's ViT-B/16 and a ModernBERT-base-sized text encoder, random weights


class BenchMeasure(str, Enum):
    pipeline = "pipeline"
    stage1 = "stage1"  # recomputed, cache build, cached
    stage1_cached = "stage1_cached"  # cache build and cached only (a compiled run: no encoder compile)
    stage2_vision = "stage2_vision"
    stage2_text = "stage2_text"
    stage2_clinical = "stage2_clinical"
    stage2_all = "stage2_all"  # with FLOPs / MFU and the memory estimate
    startup = "startup"
    text_tokens = "text_tokens"  # the reports' real-token share under each padding (no model)
    ddp = "ddp"  # CPU only: the full model's stage-2 step in each of bench.ddp_workers processes


@dataclass
class BenchConfig:
    """`python -m mdfnet_hydra.bench` (see conf/bench.yaml and docs/performance.md)."""

    # tiny: the offline default encoders; real: BiomedCLIP's ViT-B/16 + a ModernBERT-base-sized text
    # encoder, random weights
    size: BenchSize = BenchSize.tiny
    image_sizes: Optional[List[int]] = None  # None: [64, 224] tiny, [224] real
    # token ids per report, every one of them real (None: the data's own reports at tiny size, 256 at
    # real; 0: the data's own at any size, padded to the buckets as training pads them)
    text_length: Optional[int] = None
    batch_size: int = 16  # per device, as in the spec
    samples: int = 512  # synthetic training images generated for the benchmark (per image size)
    steps: int = 20  # timed steps (or batches) per measurement, after `warmup` untimed ones
    warmup: int = 3
    ddp_workers: List[int] = field(default_factory=lambda: [1, 2])  # CPU only: the stage-2 step in n gloo processes
    peak_tflops: Optional[float] = None  # dense bf16 peak of the GPU for MFU; None: known GPUs by name
    # the full model's stage-2 peak memory in bf16, traced with fake tensors (no GPU needed)
    estimate_memory: bool = True
    # what to measure (default: everything); e.g. [stage2_all] for one throughput figure
    measure: List[BenchMeasure] = field(default_factory=lambda: list(BenchMeasure))
    # also run `steps` more steps of each measurement under torch.profiler (after the timed ones, so
    # the timing is unaffected): host and device milliseconds per step in the JSON, the ops that
    # take them in profile_<measurement>.txt beside it
    profile: bool = False
    work_dir: str = MISSING  # the benchmark's feature caches
    output: str = MISSING  # the JSON file of results


@dataclass
class BenchRootConfig(TrainConfig):
    bench: BenchConfig = field(default_factory=BenchConfig)


@dataclass
class EvaluateConfig:
    experiments_dir: str = MISSING  # a run, a sweep, or a folder of both
    output_dir: str = "results"
    data_root: Optional[str] = None  # the prepared dataset, if it moved since training
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


# ---------------------------------------------------------------- python -m mdfnet_hydra.prepare
@dataclass
class MimicPathsConfig:
    cxr_jpg: str = MISSING  # MIMIC-CXR-JPG 2.x: mimic-cxr-2.0.0-{metadata,chexpert,split}.csv(.gz) + files/
    reports: str = MISSING  # MIMIC-CXR reports: files/pXX/pXXXXXXXX/sXXXXXXXX.txt
    ed: str = MISSING  # MIMIC-IV-ED: edstays, triage (in <ed> or <ed>/ed)
    hosp: str = MISSING  # MIMIC-IV: patients (in <hosp> or <hosp>/hosp)


@dataclass
class LinkConfig:
    slack_hours: float = 6.0  # a study up to this long before arrival / after departure still links
    keep_unlinked: bool = True  # studies with no ED stay: kept with missing triage features, or dropped


@dataclass
class SplitConfig:
    kind: str = "official"  # official (mimic-cxr-2.0.0-split) | random (seeded, by patient)
    seed: int = 0
    fractions: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])


@dataclass
class ReportTextConfig:
    # Report sections used as input text, in this order. Only the before-the-read sections
    # (indication, history, reason_for_exam, examination, technique, comparison) are allowed by
    # default; findings / impression (the labels' source) and wet_read / notification / addendum
    # (which repeat them) need allow_label_source=true.
    sections: List[str] = field(default_factory=lambda: ["indication", "history", "reason_for_exam"])
    chief_complaint: bool = True
    allow_label_source: bool = False


@dataclass
class ImagesConfig:
    size: int = 256  # shorter side in pixels after resizing
    quality: int = 95
    workers: int = 4


@dataclass
class PrepareChecksConfig:
    # Fewest found / studies for the run to succeed (0 turns a check off): a wrong or partial
    # source folder fails, naming the path, instead of writing a dataset without it.
    min_reports_found: float = 0.5  # studies with a report file under mimic.reports
    min_images_found: float = 0.5  # chosen images found and readable under mimic.cxr_jpg/files
    min_patients_found: float = 0.5  # studies whose patient is in MIMIC-IV patients
    min_ed_linked: float = 0.01  # studies linked to a MIMIC-IV-ED stay
    min_labels_found: float = 0.9  # chosen studies with a row of the same subject in the chexpert table
    min_split_found: float = 0.9  # chosen images listed in the split table (split.kind=official)
    min_triage_found: float = 0.5  # studies linked to an ED stay whose stay has a triage row


@dataclass
class PrepareConfig:
    mimic: MimicPathsConfig = field(default_factory=MimicPathsConfig)
    output_dir: str = MISSING
    views: List[str] = field(default_factory=lambda: ["PA", "AP"])  # in order of preference
    one_image_per_study: bool = True
    link: LinkConfig = field(default_factory=LinkConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    text: ReportTextConfig = field(default_factory=ReportTextConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    checks: PrepareChecksConfig = field(default_factory=PrepareChecksConfig)


def parse_duration(value: Optional[str]) -> Optional[float]:
    """Seconds from "3600", "3600s", "90m", "12h" or "1d" (None stays None)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise ConfigError(f"trainer.max_time must be seconds or a number with s/m/h/d, got {value!r}") from None


def to_plain(node: Any) -> Any:
    """A DictConfig / ListConfig as plain Python containers (resolved); anything else unchanged."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


# The only `_target_`s Hydra may instantiate from a config (passed by every entry point to
# @hydra.main as its execution whitelist): the project's own Hydra callback. Hydra's own logging
# classes and the Optuna sweeper's samplers are allowed by Hydra and the plugin themselves. A config
# file cannot widen it: more callables are allowed deliberately, from the shell that starts the job,
# with MDFNET_ALLOW_TARGETS=<module.callable>[,<module.callable>...].
ALLOW_TARGETS_ENV = "MDFNET_ALLOW_TARGETS"


def execution_whitelist(environ=os.environ) -> tuple[str, ...]:
    extra = [t.strip() for t in environ.get(ALLOW_TARGETS_ENV, "").split(",") if t.strip()]
    return ("mdfnet_hydra.summary.WriteSummary", *extra)


EXECUTION_WHITELIST: tuple[str, ...] = execution_whitelist()


def register_configs() -> None:
    """Store the schemas so `conf/train.yaml` / `conf/prepare.yaml` can list them first in their defaults."""
    # the schema a primary config starts from, as a group so that bench.yaml can extend train.yaml
    ConfigStore.instance().store(group="schema", name="train", node=TrainConfig, package="_global_")
    ConfigStore.instance().store(group="schema", name="bench", node=BenchRootConfig, package="_global_")
    for name, schema in OPTIMIZER_SCHEMAS.items():
        ConfigStore.instance().store(group="optimizer", name=f"{name.value}_schema", node=schema)
    ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def load_train_config(*nodes: Any, stored: bool = False) -> DictConfig:
    """A training config on the schema from plain or typed nodes (a composed config, a worker's
    payload, a checkpoint's or run record's `config`), later nodes overriding earlier ones; the
    optimizer node gets the schema its `name` chooses. `stored`: a config an earlier version wrote,
    read without the keys it has retired (`retired_keys`); anything else must fit the schema."""
    plain = [
        OmegaConf.to_container(OmegaConf.create(n) if not OmegaConf.is_config(n) else n, resolve=False) for n in nodes
    ]
    if stored:
        plain = [without_retired_keys(n) for n in plain]
    name = next(
        (
            n["optimizer"]["name"]
            for n in reversed(plain)
            if isinstance(n.get("optimizer"), dict) and n["optimizer"].get("name") is not None
        ),
        OptimizerName.adamw,
    )
    schema = OmegaConf.structured(TrainConfig)
    schema.optimizer = OmegaConf.structured(OPTIMIZER_SCHEMAS[OptimizerName(getattr(name, "value", name))])
    return OmegaConf.merge(schema, *plain)


def retired_keys(flat: dict[str, Any]) -> set[str]:
    """Dotted keys of a stored config (flat: `section.key`) that today's schema no longer has and
    that never changed what its run did: `loss.name` (a label of the weights) and, from when both
    optimizers shared one schema, the other optimizer's settings (an AdamW run's momentum)."""
    retired = {"loss.name"} & set(flat)
    name = flat.get("optimizer.name")
    name = str(getattr(name, "value", name))
    if name in OPTIMIZER_NAMES:
        fields = OPTIMIZER_SCHEMAS[OptimizerName(name)].__dataclass_fields__
        retired |= {
            f"optimizer.{key}" for key in SHARED_OPTIMIZER_KEYS if f"optimizer.{key}" in flat and key not in fields
        }
    return retired


def without_retired_keys(config: dict) -> dict:
    """A stored (nested) config without its retired keys (all of them sit one level down)."""
    top = {
        f"{section}.{key}": value
        for section, node in config.items()
        if isinstance(node, dict)
        for key, value in node.items()
    }
    retired = retired_keys(top)
    return {
        section: (
            {k: v for k, v in node.items() if f"{section}.{k}" not in retired} if isinstance(node, dict) else node
        )
        for section, node in config.items()
    }


class ConfigError(ValueError):
    """A composed config that is well-typed but cannot run; raised before any work starts."""


class RefusedOnEveryTry(ConfigError):
    """A refusal that follows from the config and the data alone, which restarted data-parallel
    workers would meet again (launch.py stops them at their start). Not for what another try can
    change: a file another node does not see yet, a device."""


def validate_config(cfg: DictConfig, host: bool = True) -> None:
    """Checks the schema cannot express. Fails at start, naming the key and what to pass instead.
    `host=False` leaves out what depends on the machine the job runs on (`host_problems`)."""
    problems: list[str] = optimizer_problems(cfg)
    try:
        # a plain copy drops the node types that let `+key=value` slip past the schema
        if not problems:
            load_train_config(
                OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]))
            )
    except Exception as err:  # omegaconf's ConfigKeyError / ValidationError name the key
        problems.append(f"config does not match the schema: {err}")
    if OmegaConf.is_missing(cfg.data, "root"):
        problems.append(f"data={cfg.data.name} needs data.root=<prepared dataset directory>")
    inputs = list(cfg.modality.inputs)
    if not inputs or len(set(inputs)) != len(inputs):
        problems.append(
            f"modality.inputs must list distinct modalities from {[m.value for m in Modality]}, got {inputs}"
        )
    run = [StageName(s) for s in cfg.stage.run]
    if run not in ([StageName.stage1], [StageName.stage2], [StageName.stage1, StageName.stage2]):
        problems.append(f"stage.run must be [stage1], [stage2] or [stage1, stage2], got {[s.value for s in run]}")
    from mdfnet_hydra.labels import CHEXPERT_LABELS

    unknown = [name for name in cfg.trainer.checkpoint.rare_labels if name not in CHEXPERT_LABELS]
    if unknown:
        problems.append(
            f"trainer.checkpoint.rare_labels has unknown labels {unknown}; choose from {list(CHEXPERT_LABELS)}"
        )
    problems += loader_problems(cfg.data)
    problems += [
        f"{key} must be >= {MIN_IMAGE_SIZE} pixels (one ViT patch), got {value}"
        for key, value in (
            # (data=processed has no synthetic section)
            ("data.synthetic.image_size", OmegaConf.select(cfg, "data.synthetic.image_size", default=None)),
            ("model.vision.image_size", cfg.model.vision.image_size),
        )
        if value is not None and int(value) < MIN_IMAGE_SIZE
    ]
    problems += length_bucket_problems(cfg.model.text)
    problems += normalisation_problems(cfg.model.vision)
    problems += text_runtime_problems(cfg)
    if str(cfg.data.get("verify_images", "auto")).lower() not in ("auto", "true", "false"):
        problems.append(f"data.verify_images must be auto, true or false, got {cfg.data.verify_images!r}")
    problems += evaluation_problems(cfg.evaluation)
    if host:
        problems += host_problems(cfg)
    for key in ("batch_size", "grad_accum", "log_every_n_steps", "nproc_per_node", "nnodes"):
        if int(cfg.trainer[key]) < 1:
            problems.append(f"trainer.{key} must be >= 1")
    focal = cfg.loss.focal_weight if cfg.loss.focal_weight is not None else 1.0 - cfg.loss.bce_weight
    if not (math.isfinite(cfg.loss.bce_weight) and math.isfinite(focal)):
        problems.append(f"loss.bce_weight and loss.focal_weight must be finite, got {cfg.loss.bce_weight}, {focal}")
    elif min(cfg.loss.bce_weight, focal) < 0 or cfg.loss.bce_weight + focal <= 0:
        problems.append("loss.bce_weight and loss.focal_weight must be >= 0 and not both 0")
    try:
        seconds = parse_duration(cfg.trainer.max_time)
        if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            problems.append(
                f"trainer.max_time must be a positive duration (or null: no limit), got {cfg.trainer.max_time!r}"
            )
    except ConfigError as err:
        problems.append(str(err))
    problems += range_problems(cfg)
    problems += hparams_problems(cfg)
    sweep_problem = multirun_only_problem(cfg)
    if sweep_problem:
        problems.append(sweep_problem)
    refuse(problems)


# the shortest model.text.max_length that keeps a word: the tokenizer adds [CLS] and [SEP] to each
# report, and cannot fit them in 1 (it returns the whole report, untruncated)
MIN_TEXT_LENGTH = 3

# Ranges the schema's types cannot hold: (key, lowest, highest, whether each bound is allowed, what
# the value means). A value outside trains nonsense without an error (a negative learning rate or
# clipping norm is gradient ascent, a focal gamma below 0 weights the easy labels most) or fails
# deep in torch after the run directory exists; NaN fails every comparison, so it is caught too.
RANGES: tuple[tuple[str, Optional[float], Optional[float], bool, bool, str], ...] = (
    ("seed", 0, None, True, True, "random seeds are non-negative"),
    ("data.small_sample", 1, None, True, True, "samples per split, or null for all"),
    ("model.clinical.dropout", 0, 1, True, False, "a probability"),
    ("model.fusion.dropout", 0, 1, True, False, "a probability"),
    ("model.head.dropout1", 0, 1, True, False, "a probability"),
    ("model.head.dropout2", 0, 1, True, False, "a probability"),
    ("model.fusion.dim", 1, None, True, True, "the fused width"),
    ("model.fusion.heads", 1, None, True, True, "attention heads"),
    ("model.fusion.layers", 1, None, True, True, "attention layers"),
    ("model.head.hidden_dim", 1, None, True, True, "the head's width"),
    ("model.text.max_length", MIN_TEXT_LENGTH, None, True, True,
     "report tokens: [CLS], [SEP] and one word; 1 turns truncation off, 2 keeps no word"),
    ("model.text.tokenizer_vocab_size", 1, None, True, True, "tokens in a trained WordPiece vocabulary"),
    ("loss.focal_alpha", None, 1, True, True, "the positives' weight; below 0 turns weighting off"),
    ("loss.focal_gamma", 0, None, True, True, "0 is plain BCE; below 0 would weight the easy labels most"),
    ("optimizer.weight_decay", 0, None, True, True, "decay towards 0"),
    ("optimizer.eps", 0, None, False, True, "AdamW's denominator term"),
    ("optimizer.momentum", 0, None, True, True, "SGD's momentum"),
    ("scheduler.warmup_start_factor", 0, 1, True, True, "the warmup's first learning rate, as a share of the peak"),
    ("scheduler.min_lr_ratio", 0, 1, True, True, "the cosine's floor, as a share of the peak"),
    ("trainer.global_batch_size", 1, None, True, True, "samples per micro-step over all devices, or null"),
    ("trainer.max_grad_norm", 0, None, False, True, "the clipping norm, or null: no clipping"),
    ("trainer.limit_train_batches", 1, None, True, True, "batches per epoch, or null for all"),
    ("trainer.limit_val_batches", 1, None, True, True, "batches per validation, or null for all"),
    ("trainer.threshold", 0, 1, True, True, "a probability"),
    ("trainer.node_rank", 0, None, True, True, "this node's index"),
    ("trainer.max_restarts", 0, None, True, True, "worker restarts"),
    ("trainer.checkpoint.every_n_epochs", 0, None, True, True, "epochs between periodic checkpoints, 0: none"),
    ("trainer.checkpoint.keep_last", 0, None, True, True, "periodic checkpoints kept"),
    ("trainer.checkpoint.num_rare", 1, None, True, True, "labels averaged for best_rare"),
    *(
        entry
        for phase in ("stage1", "stage2")
        for entry in (
            (f"phases.{phase}.epochs", 1, None, True, True, "epochs to train"),
            (f"phases.{phase}.warmup_epochs", 0, None, True, True, "epochs of linear warmup"),
            (f"phases.{phase}.lr", 0, None, False, True, "the learning rate of the fusion and head"),
            (f"phases.{phase}.lr_fusion", 0, None, False, True, "the fusion's learning rate, or null: lr"),
            (f"phases.{phase}.lr_head", 0, None, False, True, "the head's learning rate, or null: lr"),
            (f"phases.{phase}.lr_encoders", 0, None, True, True, "the encoders' learning rate"),
            (f"phases.{phase}.early_stopping_patience", 1, None, True, True, "epochs without gain, or null: never"),
        )
    ),
)  # fmt: skip


def range_problems(cfg: DictConfig) -> list[str]:
    """Each numeric option inside its range (RANGES), and the few that depend on one another."""
    problems = outside_ranges(cfg, RANGES)
    betas = OmegaConf.select(cfg, "optimizer.betas", default=None)
    if betas is not None and (len(betas) != 2 or not all(0 <= float(b) < 1 for b in betas)):
        problems.append(f"optimizer.betas must be two values within [0, 1), got {list(betas)}")
    if OmegaConf.select(cfg, "optimizer.nesterov", default=False) and not float(cfg.optimizer.momentum) > 0:
        problems.append("optimizer.nesterov needs optimizer.momentum > 0")
    hidden = OmegaConf.select(cfg, "model.clinical.hidden_dims", default=None) or []
    if any(int(width) < 1 for width in hidden):
        problems.append(f"model.clinical.hidden_dims must be widths >= 1, got {list(hidden)}")
    fusion = cfg.model.fusion
    if _uses_attention_heads(cfg) and int(fusion.dim) >= 1 and int(fusion.heads) >= 1:
        if int(fusion.dim) % int(fusion.heads):
            problems.append(
                f"model.fusion.dim ({fusion.dim}) must be a multiple of model.fusion.heads ({fusion.heads})"
            )
    rare = OmegaConf.select(cfg, "trainer.checkpoint", default=None)
    if rare is not None and not rare.rare_labels and int(rare.num_rare) > 14:
        problems.append(f"trainer.checkpoint.num_rare must be <= 14 (the CheXpert labels), got {rare.num_rare}")
    for phase in ("stage1", "stage2"):
        settings = cfg.phases[phase]
        if not OmegaConf.is_missing(settings, "epochs") and int(settings.warmup_epochs) > int(settings.epochs) >= 1:
            problems.append(
                f"phases.{phase}.warmup_epochs ({settings.warmup_epochs}) must be <= phases.{phase}.epochs "
                f"({settings.epochs}): the learning rate would never reach its peak"
            )
    if int(cfg.trainer.nnodes) >= 1 and int(cfg.trainer.node_rank) >= int(cfg.trainer.nnodes):
        problems.append(f"trainer.node_rank ({cfg.trainer.node_rank}) must be < trainer.nnodes ({cfg.trainer.nnodes})")
    problems += device_problems("trainer.device", cfg.trainer.device)
    return problems


def _uses_attention_heads(cfg: DictConfig) -> bool:
    """Attention fusion, or an encoder handing the fusion tokens (pooled by attention)."""
    if FusionKind(cfg.model.fusion.kind) is FusionKind.attention:
        return True
    inputs = {Modality(m) for m in cfg.modality.inputs}
    return any(
        m in inputs and str(getattr(cfg.model[m.value].output, "value", cfg.model[m.value].output)) == "tokens"
        for m in (Modality.vision, Modality.text)
    )


def host_problems(cfg: DictConfig) -> list[str]:
    """What depends on the machine that runs the job (its files, packages and description): checked
    by the job, not by a sweep's process, which may run elsewhere (a SLURM login node)."""
    problems = text_host_problems(cfg)
    init_from = OmegaConf.select(cfg, "stage.init_from", default=None)
    if init_from and not os.path.isfile(str(init_from)):  # (as the loader reads it: no ~ expansion)
        problems.append(f"stage.init_from={init_from}: no such checkpoint file")
    try:
        parse_machine_spec(os.environ.get(MACHINE_ENV_VAR, ""))
    except ValueError as err:
        problems.append(str(err))
    return problems


def outside_ranges(
    cfg: DictConfig, ranges: tuple[tuple[str, Optional[float], Optional[float], bool, bool, str], ...]
) -> list[str]:
    """A problem for each option of `ranges` (as RANGES) outside its range; null is the option's
    documented 'unset' and passes, NaN and infinities never do."""
    problems = []
    for key, low, high, low_ok, high_ok, meaning in ranges:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        value = float(value)
        inside = math.isfinite(value)
        inside = inside and (low is None or value > low or (low_ok and value == low))
        inside = inside and (high is None or value < high or (high_ok and value == high))
        if not inside:
            problems.append(f"{key} must be {_describe_range(low, high, low_ok, high_ok)} ({meaning}), got {value:g}")
    return problems


def _describe_range(low: Optional[float], high: Optional[float], low_ok: bool, high_ok: bool) -> str:
    if high is None:
        return f"{'>=' if low_ok else '>'} {low:g}"
    if low is None:
        return f"{'<=' if high_ok else '<'} {high:g}"
    return f"within {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_problems(key: str, value: Any) -> list[str]:
    """`auto`, `cpu`, `cuda` or `cuda:<index>`: what the project computes on."""
    if DEVICE.fullmatch(str(value)):
        return []
    return [f"{key} must be auto, cpu, cuda or cuda:<index>, got {value!r}"]


MIN_BOOTSTRAP = 100  # fewer resamples: a "95% interval" of a few points, p-values of 1 / n_bootstrap


def evaluation_problems(options: DictConfig) -> list[str]:
    """The evaluation options' ranges, checked by a training job at start (it evaluates at its end)
    and by `python -m mdfnet_hydra.evaluate` before it reads a run: a negative bootstrap count or a
    sensitivity above 1 would otherwise give a report without intervals or thresholds, silently."""
    problems = []
    if options.num_workers is not None and int(options.num_workers) < 0:
        problems.append(
            f"evaluation.num_workers must be >= 0 (or null: chosen from the machine), got {options.num_workers}"
        )
    for key, low, meaning in (
        ("n_bootstrap", 0, "0: no intervals or p-values"),
        ("saliency_per_label", 0, "0: no saliency maps"),
        ("max_curves", 1, "runs drawn in one figure"),
        ("batch_size", 1, "studies per forward pass"),
    ):
        if int(options[key]) < low:
            problems.append(f"evaluation.{key} must be >= {low} ({meaning}), got {options[key]}")
    if 0 < int(options.n_bootstrap) < MIN_BOOTSTRAP:  # a 95% interval from a handful of resamples is not one
        problems.append(
            f"evaluation.n_bootstrap must be 0 (no intervals or p-values) or >= {MIN_BOOTSTRAP} (resamples behind "
            f"each 95% interval and p-value), got {options.n_bootstrap}"
        )
    if not 0 < float(options.target_sensitivity) <= 1:
        problems.append(f"evaluation.target_sensitivity must be within (0, 1], got {options.target_sensitivity}")
    if int(options.seed) < 0:
        problems.append(f"evaluation.seed must be >= 0 (the bootstrap's seed), got {options.seed}")
    problems += device_problems("evaluation.device", options.device)
    return problems


def global_batch_problem(global_batch_size: Optional[int], world_size: int) -> Optional[str]:
    """`trainer.global_batch_size` that does not split into equal per-device batches of >= 1 over
    `world_size` workers: the one wording of the launcher, torchrun's ranks and SLURM's tasks."""
    if global_batch_size is None or world_size < 1 or int(global_batch_size) % world_size == 0:
        return None
    below = int(global_batch_size) // world_size * world_size
    nearest = " or ".join(str(n) for n in (below, below + world_size) if n >= 1)
    return (
        f"trainer.global_batch_size={global_batch_size} does not split over {world_size} workers "
        f"(world size): use a multiple of {world_size} ({nearest})"
    )


def refuse(problems: list[str]) -> None:
    """End a start that found problems: one ConfigError listing them all (cli.py prints it)."""
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def hparams_problems(cfg: DictConfig) -> list[str]:
    """The sweep settings' own problems: the sweeper checks them before it touches the study (a
    job would only find them in trial 0), and every job again."""
    hparams = cfg.get("hparams")
    if hparams is None:
        return []
    problems = []
    if hparams.objective not in ("single", "multi"):
        problems.append(f"hparams.objective must be 'single' or 'multi', got {hparams.objective!r}")
    if int(hparams.n_trials) < 1:
        problems.append(f"hparams.n_trials must be >= 1 (the study's total of trials), got {hparams.n_trials}")
    if not 0 <= float(hparams.max_failure_rate) <= 1:
        problems.append(f"hparams.max_failure_rate must be within [0, 1], got {hparams.max_failure_rate}")
    pruner = hparams.pruner
    if pruner.name == PrunerName.none:
        return problems
    if hparams.objective == "multi":
        problems.append(
            "hparams.pruner needs hparams.objective=single: Optuna prunes single-objective studies only "
            "(pass hparams.pruner.name=none with hparams.objective=multi)"
        )
    minimum = {
        "n_startup_trials": 0,
        "n_warmup_steps": 0,
        "interval_steps": 1,
        "min_resource": 1,
        "reduction_factor": 2,
    }
    problems += [
        f"hparams.pruner.{key} must be >= {least}, got {pruner[key]}"
        for key, least in minimum.items()
        if int(pruner[key]) < least
    ]
    if pruner.max_resource is not None and int(pruner.max_resource) < int(pruner.min_resource):
        problems.append(
            f"hparams.pruner.max_resource ({pruner.max_resource}) must be >= min_resource ({pruner.min_resource})"
        )
    return problems


def optimizer_problems(cfg: DictConfig) -> list[str]:
    """The optimizer node must be built on its name's schema: an option file without
    `defaults: [<name>_schema]`, or `optimizer.name=` switched on another option, would lack (or
    carry) the other optimizer's settings."""
    name = OmegaConf.select(cfg, "optimizer.name", default=None, throw_on_missing=False)
    name = getattr(name, "value", name)
    if name not in OPTIMIZER_NAMES:
        return [f"optimizer.name must be one of {sorted(OPTIMIZER_NAMES)}, got {name!r}"]
    built_on = OmegaConf.get_type(cfg.optimizer)
    if built_on is not OPTIMIZER_SCHEMAS[OptimizerName(name)]:
        return [
            f"optimizer.name={name} on an option built on {getattr(built_on, '__name__', built_on)}: choose "
            f"optimizer={name}; an optimizer option of your own starts with `defaults: [{name}_schema, _self_]`"
        ]
    return []


def multirun_only_message(preset: str) -> str:
    """Said to a user who ran a sweep preset as one job, which would train one default config."""
    return f"{preset} is a sweep (several jobs) and runs only with --multirun: python -m mdfnet_hydra.train --multirun {preset} ..."


def multirun_only_problem(cfg: DictConfig, hydra_cfg: Optional[DictConfig] = None) -> Optional[str]:
    """A config that lists sweep parameters (`hydra.sweeper.params`) running as one job: Hydra would
    silently train one default config. The backstop for a sweep preset whose `hydra.run.dir` was
    overridden. `hydra_cfg`: the `hydra` node (HydraConfig's when omitted); without one (a
    data-parallel worker, a composed test config) nothing is checked."""
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra_cfg is None or str(getattr(hydra_cfg.get("mode"), "name", hydra_cfg.get("mode"))) != "RUN":
        return None
    if not OmegaConf.select(hydra_cfg, "sweeper.params", default=None, throw_on_resolution_failure=False):
        return None
    choices = OmegaConf.select(hydra_cfg, "runtime.choices", default=None) or {}
    presets = [
        f"{group}={choices[group]}" for group in ("experiment", "hparams") if choices.get(group) not in (None, "null")
    ]
    return multirun_only_message(" ".join(presets) or "hydra.sweeper.params")


def length_bucket_problems(text: TextConfig) -> list[str]:
    buckets = [int(b) for b in text.length_buckets]
    if not buckets:
        return []
    if buckets[0] < 1 or any(b >= c for b, c in zip(buckets, buckets[1:])):
        return [f"model.text.length_buckets must be increasing positive lengths, got {buckets}"]
    if buckets[-1] < int(text.max_length):
        return [
            f"model.text.length_buckets' largest ({buckets[-1]}) is shorter than model.text.max_length "
            f"({text.max_length}): add {text.max_length} (or [] to pad to each batch's longest)"
        ]
    longer = [b for b in buckets if b > int(text.max_length)]
    if longer:  # no report is longer than max_length: a batch put there would only compute on padding
        return [
            f"model.text.length_buckets has lengths above model.text.max_length ({text.max_length}): {longer}; "
            f"no report is longer, so batches padded to them compute on padding alone: end the list at "
            f"{text.max_length}"
        ]
    return []


# the smallest image a ViT encoder takes: one 16-pixel patch (BiomedCLIP's and the tiny test ViT's)
MIN_IMAGE_SIZE = 16


def normalisation_problems(vision: VisionConfig) -> list[str]:
    """`model.vision.mean` / `std` torchvision's Normalize can use on RGB images: three values each,
    finite, std > 0. Otherwise torchvision fails (or divides by zero) while the feature cache is built."""
    problems = []
    for key in ("mean", "std"):
        values = [float(v) for v in vision[key]]
        positive = key == "std"
        if not three_channel_values(values, positive):
            problems.append(
                f"model.vision.{key} must be 3 {'positive ' if positive else ''}values (one per RGB channel), "
                f"got {values}"
            )
    return problems


def three_channel_values(values: Any, positive: bool) -> bool:
    """Three finite numbers, one per RGB channel (each > 0 where `positive`): what torchvision's
    Normalize needs of a mean or std, from a config or a pretrained directory's preprocess_cfg."""
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return False
    return not positive or all(v > 0 for v in values)


def bench_problems(cfg: DictConfig) -> list[str]:
    """`bench.*` values the benchmark cannot measure with, named at start."""
    b = cfg.bench
    problems = [
        f"bench.{key} must be >= {low}, got {b[key]}"
        for key, low in (("steps", 1), ("warmup", 0), ("batch_size", 1), ("samples", 1))
        if int(b[key]) < low
    ]
    if b.image_sizes is not None and any(int(size) < MIN_IMAGE_SIZE for size in b.image_sizes):
        problems.append(
            f"bench.image_sizes must be >= {MIN_IMAGE_SIZE} pixels (one ViT patch), got {list(b.image_sizes)}"
        )
    if b.text_length is not None and int(b.text_length) < 0:
        problems.append(f"bench.text_length must be >= 0 (0: the data's own reports; or null), got {b.text_length}")
    measures = {BenchMeasure(m) for m in b.measure}
    if BenchMeasure.ddp in measures and any(int(n) < 1 for n in b.ddp_workers):
        problems.append(f"bench.ddp_workers must list process counts >= 1, got {list(b.ddp_workers)}")
    if b.profile and not measures - {BenchMeasure.startup, BenchMeasure.text_tokens, BenchMeasure.ddp}:
        problems.append(
            "bench.profile=true profiles training steps, and bench.measure has none "
            f"({sorted(m.value for m in measures)}): add one (e.g. stage2_all) or drop bench.profile"
        )
    return problems


def text_runtime_problems(cfg: DictConfig) -> list[str]:
    """How the text encoder is asked to run, where this machine or config cannot."""
    problems = []
    uses_text = Modality.text in [Modality(m) for m in cfg.modality.inputs]
    mode = CompileMode(cfg.trainer.compile_mode)
    if uses_text and cfg.trainer.compile and mode.cuda_graphs and not cfg.model.text.length_buckets:
        problems.append(
            f"trainer.compile_mode={mode.value} records a CUDA graph for every report length: give "
            "model.text.length_buckets (e.g. [32,64,128], the largest model.text.max_length)"
        )
    if uses_text and TextAttention(cfg.model.text.attention) is TextAttention.flash_attention_2:
        if Precision(cfg.trainer.precision) is Precision.fp32:
            problems.append(
                "model.text.attention=flash_attention_2 computes in half precision only: not with trainer.precision=fp32"
            )
    return problems


def text_host_problems(cfg: DictConfig) -> list[str]:
    """The packages and device the text encoder's kernel needs on the machine that runs the job."""
    uses_text = Modality.text in [Modality(m) for m in cfg.modality.inputs]
    attention = TextAttention(cfg.model.text.attention)
    if uses_text and attention is TextAttention.flex_attention and computes_on_cpu(str(cfg.trainer.device)):
        # inductor's CPU flex-attention kernel fails on the padded report batches ('index out of
        # bounds ... cur_qSplitSize') while the feature cache is built, after minutes of compiling
        return [
            "model.text.attention=flex_attention runs on CUDA only, and this job computes on the CPU "
            f"(trainer.device={cfg.trainer.device}); use model.text.attention=sdpa"
        ]
    if not uses_text or attention is not TextAttention.flash_attention_2:
        return []
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return [
            "model.text.attention=flash_attention_2 needs the flash-attn package (pip install flash-attn, "
            "on a CUDA machine); model.text.attention=sdpa needs nothing"
        ]
    return []


def computes_on_cpu(device: str) -> bool:
    """Whether `trainer.device` computes on this machine's CPU: `cpu`, or no usable CUDA (`auto`
    picks the CPU; a machine MDFNET_MACHINE describes as CUDA computes on the CPU here)."""
    import torch

    return device == "cpu" or not torch.cuda.is_available()


def loader_problems(data: DataConfig) -> list[str]:
    """`data.*` DataLoader values that torch would reject at stage 2's first batch, or that
    contradict each other (worker settings with `num_workers=0`), named at start instead. With
    `num_workers=null` the machine decides, and worker settings apply only where it picks workers."""
    import multiprocessing

    problems = []
    start = getattr(data.worker_start, "value", data.worker_start)
    if start is not None and start not in multiprocessing.get_all_start_methods():
        problems.append(
            f"data.worker_start={start} is not available here; use one of {multiprocessing.get_all_start_methods()}"
        )
    if data.num_workers is not None and int(data.num_workers) < 0:
        problems.append(f"data.num_workers must be >= 0 (or null: chosen from the machine), got {data.num_workers}")
    if data.prefetch_factor is not None and int(data.prefetch_factor) < 1:
        problems.append(f"data.prefetch_factor must be >= 1 (or null), got {data.prefetch_factor}")
    if data.num_workers == 0 and (
        data.persistent_workers or data.prefetch_factor is not None or data.worker_start is not None
    ):
        problems.append(
            "data.persistent_workers / prefetch_factor / worker_start need worker processes, but data.num_workers=0"
        )
    return problems
