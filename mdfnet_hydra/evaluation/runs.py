"""Finding finished runs under a directory and getting their validation / test predictions.

A run is one stage directory (`<job>/stage1`, `<job>/stage2`) with a metrics.json and checkpoints,
from any launcher. Saved predictions are reused when they were made by the chosen checkpoint (same
file digest); otherwise the checkpoint is loaded and run on the split again.

A run whose files cannot be used (a metrics.json or config.yaml that does not parse or is missing,
a stage that left training outputs but no metrics.json because it never finished, a checkpoint
that is missing, truncated or needs pickle, damaged saved predictions with no usable checkpoint to
recompute them from) is left out: `LeftOutError` / `LeftOut` name the file and the reason, and the
evaluation reports them and goes on with the other runs. Nothing is ever unpickled: checkpoints load
with `torch.load(weights_only=True)`, predictions with `np.load(allow_pickle=False)`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mdfnet_hydra.checkpoint import load_checkpoint
from mdfnet_hydra.config import ConfigError, Modality, TextAttention, modality_label
from mdfnet_hydra.evaluation.inputs import stage_directories
from mdfnet_hydra.files import DamagedFileError
from mdfnet_hydra.identity import outcome_identity
from mdfnet_hydra.predictions import DamagedPredictionsError, Predictions, file_digest, load_predictions
from mdfnet_hydra.tracking import public_text

log = logging.getLogger(__name__)

HYPERPARAMETERS = {
    "lr_stage1": ("phases", "stage1", "lr"),
    "lr_encoders_stage2": ("phases", "stage2", "lr_encoders"),
    "lr_fusion_stage2": ("phases", "stage2", "lr_fusion"),
    "weight_decay": ("optimizer", "weight_decay"),
    "dropout_fusion": ("model", "fusion", "dropout"),
    "dropout_head": ("model", "head", "dropout1"),
    "bce_weight": ("loss", "bce_weight"),
    "focal_alpha": ("loss", "focal_alpha"),
    "focal_gamma": ("loss", "focal_gamma"),
}


# Keys of a run's stored config.yaml that change where, how fast or how verbosely a run computes, or
# how it is evaluated later, never what it learns: runs differing only in these (and the seed) are
# seeds of one configuration. The batch keys are replaced by the effective batch (per device x
# devices x accumulation steps), so 1 GPU x 32 and 2 GPUs x 16 group, 1 x 32 and 2 x 32 do not.
# Everything else is compared, conservatively: device, precision, feature-cache dtype, stage.init_from,
# the data's location for real data (paths are compared for data.root unless the data is synthetic,
# whose root is derived from data.synthetic).
@dataclass
class LeftOut:
    """A run the evaluation could not use, the file that stopped it, and why."""

    run: str
    file: Path
    reason: str

    def describe(self, root: Optional[Path] = None) -> str:
        return f"{self.run} ({shown_path(self.file, root)}: {self.reason})"


class LeftOutError(Exception):
    """This run cannot be evaluated: `file` is missing or damaged (`reason`, one line)."""

    def __init__(self, file: Path, reason: str) -> None:
        self.file, self.reason = Path(file), one_line(reason, limit=600)
        super().__init__(f"{self.file}: {self.reason}")


class NoRunEvaluatedError(RuntimeError):
    """Runs were found, and every one of them had to be left out."""


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_path(path: Path, root: Optional[Path]) -> str:
    if root is not None:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return str(path)


@dataclass
class Run:
    name: str  # relative to the experiments directory, e.g. "sweep/3_vision/stage2"
    directory: Path
    stage: str
    modalities: list[str]
    config: dict[str, Any]
    seed: int
    source: dict[str, str] = field(default_factory=dict)  # split -> "saved" | "recomputed"
    effective_batch: Optional[int] = None  # metrics.json's effective_batch_size (else from the config)
    notes: list[str] = field(default_factory=list)  # damaged files worked around (recomputed predictions)
    # "after E of N epochs" when trainer.max_time stopped the stage early: not a seed of runs that trained
    # all their epochs (nor of runs stopped elsewhere)
    stopped_by_max_time: Optional[str] = None

    @property
    def modality(self) -> str:
        return modality_label(self.modalities)

    @property
    def label(self) -> str:
        """The name in figure legends: with the modality where the directory names do not say it."""
        return self.name if self.modality in self.name else f"{self.name} ({self.modality})"

    def hyperparameters(self) -> dict[str, Any]:
        out = {}
        for name, path in HYPERPARAMETERS.items():
            node: Any = self.config
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            out[name] = node
        return out

    def identity(self) -> dict[str, Any]:
        """The stored config's outcome identity (identity.py) without the seed, plus the stage directory."""
        flat = outcome_identity(self.config, self.effective_batch)
        flat.pop("seed", None)
        flat["(stage directory)"] = self.stage
        if self.stopped_by_max_time:
            flat["(stopped by trainer.max_time)"] = self.stopped_by_max_time
        return flat

    def signature(self) -> str:
        """Equal for runs whose configurations differ in the seed alone (to aggregate seeds)."""
        return json.dumps(self.identity(), sort_keys=True, default=str)


def discover(
    experiments_dir: Path, exclude: Optional[Path] = None, left_out: Optional[list[LeftOut]] = None
) -> list[Run]:
    """Finished stage directories under `experiments_dir`. One whose metrics.json or config.yaml
    cannot be read, or that holds training outputs without a metrics.json (a stage that never
    finished), is logged, added to `left_out` and skipped."""
    runs = []
    for directory in stage_directories(experiments_dir, exclude):
        name = str(directory.relative_to(experiments_dir)) if directory != experiments_dir else directory.name
        try:
            run = _read_run(directory, name)
        except LeftOutError as err:
            leave_out(left_out, name, err, experiments_dir)
            continue
        if run is not None:
            runs.append(run)
    return runs


INCOMPLETE = "incomplete: no metrics.json, training did not finish (killed, failed, or still running)"


def leave_out(left_out: Optional[list[LeftOut]], name: str, err: LeftOutError, root: Optional[Path] = None) -> None:
    reason = public_text(err.reason, err)  # (from a data error: its patients withheld, as in every file)
    log.warning("%s: left out of the evaluation: %s: %s", name, shown_path(err.file, root), reason)
    if left_out is not None:
        left_out.append(LeftOut(name, err.file, reason))


def _read_run(directory: Path, name: str) -> Optional[Run]:
    metrics = directory / "metrics.json"
    if not metrics.is_file():
        raise LeftOutError(metrics, INCOMPLETE)
    result = read_json(metrics)
    if not isinstance(result, dict):
        raise LeftOutError(metrics, f"holds a JSON {type(result).__name__}, not the object a finished stage writes")
    if "stage" not in result or not result.get("val"):
        return None  # a job-level summary, or a stage that never finished an epoch
    if not isinstance(result.get("modalities"), list):
        raise LeftOutError(metrics, "no list of modalities in it: not what a finished stage writes")
    config_path = directory / "config.yaml"
    if not config_path.is_file():
        raise LeftOutError(config_path, "missing: the stage's resolved config, needed to group and label it")
    try:
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    except Exception as err:  # noqa: BLE001 - whatever a damaged YAML file makes the parser raise
        raise LeftOutError(config_path, f"does not parse as YAML ({type(err).__name__}: {err})") from err
    if not isinstance(config, dict):
        raise LeftOutError(config_path, "is not a mapping of config keys")
    try:
        seed = int(config.get("seed", 0))
    except (TypeError, ValueError) as err:
        raise LeftOutError(config_path, f"seed {config.get('seed')!r} is not an integer") from err
    batch = result.get("effective_batch_size")
    return Run(
        name=name,
        directory=directory,
        stage=str(result["stage"]),
        modalities=[str(m) for m in result["modalities"]],
        config=config,
        seed=seed,
        effective_batch=batch if isinstance(batch, int) else None,
        stopped_by_max_time=_time_stop(result, config),
    )


def _time_stop(result: dict[str, Any], config: dict[str, Any]) -> Optional[str]:
    """`after E of N epochs` for a stage that trainer.max_time stopped before its last epoch, else None."""
    if result.get("stopped_by") != "max_time":
        return None
    phases = config.get("phases")
    phase = phases.get(str(result["stage"])) if isinstance(phases, dict) else None
    epochs = phase.get("epochs") if isinstance(phase, dict) else None
    if epochs is not None and result.get("epochs_run") == epochs:
        return None  # (an older job's record: it had run every epoch)
    return f"after {result.get('epochs_run')} of {epochs} epochs"


def read_json(path: Path) -> Any:
    """The JSON in `path`; `LeftOutError` naming it if it cannot be read or is not (whole) JSON."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise LeftOutError(path, f"cannot be read ({type(err).__name__}: {err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        what = "empty" if not text.strip() else f"not valid JSON ({err.msg}: line {err.lineno}, column {err.colno})"
        raise LeftOutError(path, f"{what}: a write cut short? Rerun the stage to rewrite it") from err


def run_predictions(run: Run, split: str, checkpoint: str, data_root: Optional[str], options) -> Predictions:
    """Saved predictions of `checkpoint` on `split`, or new ones (`options`: evaluation.*).

    Damaged saved predictions are recomputed from the checkpoint, with a note on the run; a missing or
    damaged checkpoint that has to be loaded raises `LeftOutError` naming it."""
    ckpt_path = run.directory / "checkpoints" / f"{checkpoint}.pth"
    if not ckpt_path.is_file():
        raise LeftOutError(ckpt_path, f"no {checkpoint} checkpoint (evaluation.checkpoint picks another)")
    try:
        digest = file_digest(ckpt_path)
    except OSError as err:
        raise LeftOutError(ckpt_path, f"cannot be read ({type(err).__name__}: {err})") from err
    saved = run.directory / "predictions" / f"{split}.npz"
    damaged: Optional[DamagedPredictionsError] = None
    if saved.is_file() and data_root is None:
        try:
            preds = load_predictions(saved)
        except DamagedPredictionsError as err:
            damaged = err
            log.warning(
                "%s: %s is damaged (%s); recomputing the %s predictions from %s",
                run.name,
                saved,
                err.reason,
                split,
                ckpt_path,
            )
        else:
            if preds.checkpoint_sha256 and preds.checkpoint_sha256 == digest:
                run.source[split] = "saved"
                return preds
    try:
        model, datasets, prep = load_run_model(ckpt_path, data_root, options.device, splits=(split,))
    except LeftOutError as err:
        if damaged is not None:
            raise LeftOutError(
                err.file, f"{err.reason} (and predictions/{split}.npz is damaged too: {damaged.reason})"
            ) from err
        raise
    run.source[split] = "recomputed"
    if damaged is not None:
        run.notes.append(
            f"predictions/{split}.npz damaged ({damaged.reason}): recomputed from checkpoints/{ckpt_path.name}"
        )
    preds = predict(model, datasets[split], prep.pad_id, options, digest)
    bad = int((~np.isfinite(preds.probs)).sum())
    if bad:  # a diverged model's checkpoint (an older version kept one as the best): no AUROC is defined
        raise LeftOutError(
            ckpt_path, f"{bad} of {preds.probs.size} of its {split} predictions are NaN or infinite (a diverged model)"
        )
    if data_root is not None and damaged is None and saved.is_file():
        _note_other_cases(run, split, saved, preds, data_root)
    return preds


def _note_other_cases(run: Run, split: str, saved: Path, preds: Predictions, data_root: str) -> None:
    """`data_root` is meant to be the run's own dataset, moved: a split whose cases are not those the
    run saved predictions for is another dataset (or another version of it), said in the run's notes."""
    try:
        before = set(load_predictions(saved).sample_id.tolist())
    except DamagedPredictionsError:
        return
    now = set(preds.sample_id.tolist())
    if now != before:
        run.notes.append(
            f"data_root={data_root}: its {split} split has {len(now)} cases, {len(now & before)} of them among "
            f"the {len(before)} the run saved predictions for: not the dataset the run was trained and saved on"
        )


def run_config(ckpt: dict, data_root: Optional[str]) -> DictConfig:
    """The run's training config as its checkpoint stores it. Token ids are made in memory: the
    evaluation never writes into a cache directory that a stored config names."""
    from mdfnet_hydra.config import load_train_config

    cfg = load_train_config(ckpt["config"], {"data": {"token_cache": False}}, stored=True)
    if data_root is not None:
        cfg.data.root = data_root
        cfg.data.synthetic = None
    return cfg


REQUIRED_CHECKPOINT_KEYS = ("model", "config", "modalities", "preprocessing")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint in `path`, loaded without pickle; `LeftOutError` naming it if it is missing,
    unreadable, truncated, needs pickle (never executed) or lacks what a run's checkpoint holds."""
    try:
        ckpt = load_checkpoint(path)
    except FileNotFoundError as err:
        raise LeftOutError(path, "missing") from err
    except DamagedFileError as err:  # its message names the file: the reason is what follows
        cause = err.__cause__
        reason = (
            _checkpoint_problem(cause) if isinstance(cause, Exception) else str(err).replace(f"checkpoint {path} ", "")
        )
        raise LeftOutError(path, reason) from err
    except Exception as err:  # noqa: BLE001 - whatever torch.load raises for a file it cannot read
        raise LeftOutError(path, _checkpoint_problem(err)) from err
    if not isinstance(ckpt, dict):
        raise LeftOutError(path, f"holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    missing = [key for key in REQUIRED_CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise LeftOutError(
            path, f"no {', '.join(missing)} entr{'y' if len(missing) == 1 else 'ies'}: not a checkpoint of a run"
        )
    return ckpt


def _checkpoint_problem(err: BaseException) -> str:
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        return (
            f"holds Python objects{what} that only pickle could load; refused, since checkpoints hold tensors and "
            "plain containers only (torch.load weights_only=True)"
        )
    if isinstance(err, RuntimeError) and "zip archive" in str(err):
        return "not a complete checkpoint archive (truncated, or not a torch.save file)"
    return one_line(f"cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})", 200)


def load_run_model(ckpt_path: Path, data_root: Optional[str], device: str, splits=("test",)):
    """The checkpoint's model (eval mode, on device), datasets built with its own preprocessing, and
    that preprocessing (for the collator's padding id). `LeftOutError` if the checkpoint cannot be
    used, or the data it names to recompute predictions on is not there."""
    from mdfnet_hydra.job import open_job

    ckpt = read_checkpoint(ckpt_path)
    try:
        cfg = run_config(ckpt, data_root)
        cfg.modality.inputs = [Modality(m) for m in ckpt["modalities"]]
        # how training ran its text encoder, not what it learned: the evaluation runs SDPA, which every
        # machine has (a run trained with flash-attn is evaluated where flash-attn is not installed)
        cfg.model.text.attention = TextAttention.sdpa
        cfg.model.text.length_buckets = []
    except Exception as err:  # noqa: BLE001 - a stored config the schema refuses
        raise LeftOutError(
            ckpt_path, f"its stored config does not fit the schema ({type(err).__name__}: {err})"
        ) from err
    try:
        job = open_job(cfg, state=ckpt["preprocessing"], splits=splits)
    except FileNotFoundError as err:
        raise LeftOutError(
            Path(err.filename or cfg.data.root),
            "the data needed to recompute predictions is not there (evaluate with data_root=<dir>)",
        ) from err
    except (ValueError, OSError, ConfigError) as err:  # ManifestError, UnreadableImageError, a bad data config
        raise LeftOutError(
            Path(str(cfg.data.root)),
            f"its data cannot be loaded to recompute predictions ({type(err).__name__}: {str(err).splitlines()[0]})",
        ) from err
    empty = [split for split in splits if split not in job.datasets]
    if empty:
        raise LeftOutError(Path(str(cfg.data.root)), f"its {', '.join(empty)} split is empty: nothing to predict")
    model = job.build_model()
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise LeftOutError(
            ckpt_path, f"its weights do not fit the model its config builds ({str(err).splitlines()[0]})"
        ) from err
    model.eval().to(resolve_device(device))
    return model, job.datasets, job.prep


@torch.no_grad()
def predict(model, dataset, pad_id: int, options, checkpoint_sha256: str) -> Predictions:
    """Probabilities of `model` on `dataset`, read with this machine's loader choices
    (`evaluation.num_workers`: null = chosen from the machine, as in training)."""
    from torch.utils.data import DataLoader

    from mdfnet_hydra.config import DataConfig
    from mdfnet_hydra.data.dataset import Collator
    from mdfnet_hydra.data.loading import describe_loader, loader_settings

    runtime = evaluation_runtime(options.device)
    # the machine's choices for every loader setting but the worker count evaluation.* may fix
    loader_choices = OmegaConf.merge(OmegaConf.structured(DataConfig), {"num_workers": options.num_workers})
    loader = DataLoader(
        dataset,
        batch_size=int(options.batch_size),
        shuffle=False,
        collate_fn=Collator(pad_id),
        **loader_settings(loader_choices, runtime, dataset, persistent=False),
    )
    log.info(
        "predicting %d %s cases on %s, data loading %s",
        len(dataset),
        dataset.split.name,
        runtime.device,
        describe_loader(loader),
    )
    probs = []
    for batch in loader:
        batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}
        probs.append(torch.sigmoid(model(batch).float()).cpu())
    split = dataset.split
    return Predictions(
        torch.cat(probs).numpy(),
        split.targets,
        split.mask,
        split.frame["sample_id"].to_numpy(dtype=str),
        split.group,
        checkpoint_sha256,
    )


def evaluation_runtime(device: str):
    """fp32 on `evaluation.device` (auto: CUDA where the machine has it), with the machine's choices."""
    from mdfnet_hydra.config import Precision
    from mdfnet_hydra.machine import Machine, set_compute_threads
    from mdfnet_hydra.runtime import Runtime
    from mdfnet_hydra.runtime import resolve_device as runtime_device

    machine = Machine.detect()
    threads = set_compute_threads()
    target, where = runtime_device(device, machine, key="evaluation.device")
    return Runtime(device=where, precision=Precision.fp32, machine=machine, target=target, threads=threads)


def resolve_device(name: str) -> torch.device:
    return evaluation_runtime(name).device


def aligned(a: Predictions, b: Predictions) -> Optional[tuple[Predictions, Predictions]]:
    """Both runs' predictions on the same cases in the same order, or None where they are not
    comparable (`comparable`)."""
    return comparable(a, b)[0]


def comparable(a: Predictions, b: Predictions) -> tuple[Optional[tuple[Predictions, Predictions]], str]:
    """Both runs' predictions on the same cases in the same order, or None and why not. A paired
    comparison needs the same cases scored against the same labels: another label policy
    (data.labels.*) gives the same cases other targets or masks, and each run's AUROC would then
    measure something else."""
    if len(a.sample_id) != len(b.sample_id) or set(a.sample_id) != set(b.sample_id):
        return None, "other test cases"
    mine, theirs = a.subset(np.argsort(a.sample_id, kind="stable")), b.subset(np.argsort(b.sample_id, kind="stable"))
    scored = mine.mask > 0
    differs = (scored != (theirs.mask > 0)) | (scored & ((mine.targets > 0.5) != (theirs.targets > 0.5)))
    cases = int(differs.any(axis=1).sum())
    if cases:
        return None, (
            f"same test cases, but other targets or masks on {cases} of {len(mine.sample_id)}: "
            "another label policy (data.labels.*)?"
        )
    return (mine, theirs), ""
