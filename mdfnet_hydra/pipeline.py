"""A training job: data and preprocessing once, then each phase of `stage.run` in its own directory.

Stage 2 of a two-stage job starts from stage 1's selected best checkpoint. A phase whose directory
already holds metrics.json is complete and is skipped, and an interrupted phase resumes from its
`last` checkpoint, so re-running a job (a requeued SLURM job) continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from mdfnet_hydra.checkpoint import is_readable, load_checkpoint, load_weights, model_settings_differences, move_aside
from mdfnet_hydra.config import ConfigError, parse_duration, to_plain
from mdfnet_hydra.data.dataset import SplitData, label_warnings, resolve_root
from mdfnet_hydra.data.preprocessing import Preprocessing
from mdfnet_hydra.distributed import (
    barrier,
    broadcast_from_main,
    destroy_process_group,
    init_process_group,
    main_first,
    refuse_differing_configs,
    worker_env,
)
from mdfnet_hydra.evaluation import evaluate_quietly
from mdfnet_hydra.files import DamagedFileError, remove_stale_temporaries, write_text
from mdfnet_hydra.job import Job, modality_names, open_job
from mdfnet_hydra.labels import CHEXPERT_LABELS
from mdfnet_hydra.losses import describe_loss
from mdfnet_hydra.metrics import rarest_labels
from mdfnet_hydra.models.sources import DIGEST_KEY, refuse_changed_encoders
from mdfnet_hydra.optim import describe_optimizer_config
from mdfnet_hydra.predictions import file_digest
from mdfnet_hydra.pruning import PruningTarget
from mdfnet_hydra.report import format_summary
from mdfnet_hydra.run_directory import RunDirectoryBusy, RunDirectoryConflict, claim
from mdfnet_hydra.runtime import Runtime, resolve_device, seed_everything
from mdfnet_hydra.signals import sigterm_unwinds
from mdfnet_hydra.tracking import attach_log_file, detach_log_file, log_failure
from mdfnet_hydra.trainer import PhaseTrainer

log = logging.getLogger(__name__)


def run(
    cfg: DictConfig, claim_run_dir: bool = False, evaluate_at_end: bool = True, pruning: PruningTarget | None = None
) -> dict[str, Any]:
    """Train every phase of `stage.run` of a validated config; return the job summary (written to
    <run>/metrics.json).

    Every rank of a data-parallel job runs this; only rank 0 logs progress and writes files.
    `claim_run_dir`: workers that torchrun / srun started claim the run directory here (rank 0,
    once the process group exists, so every rank learns a refusal); otherwise the process that
    started the job holds it (launch.py). `evaluate_at_end`: the evaluation of a two-stage job
    (its caller decides: a multirun evaluates its runs once, at its end). `pruning`: the sweep's
    trial this job reports its epochs to (pruning.py).
    """
    with sigterm_unwinds():  # SIGTERM ends the job as Ctrl-C does: a line in its log, files whole
        return _run_process(cfg, claim_run_dir, evaluate_at_end, pruning)


def _run_process(
    cfg: DictConfig, claim_run_dir: bool, evaluate_at_end: bool, pruning: PruningTarget | None
) -> dict[str, Any]:
    env = worker_env(nproc_per_node=int(cfg.trainer.nproc_per_node))
    runtime = Runtime.from_config(cfg.trainer, env)
    if evaluate_at_end and cfg.evaluation.on_finish:  # a device the end-of-run evaluation cannot use: now, not then
        resolve_device(str(cfg.evaluation.device), runtime.machine, key="evaluation.device")
    if runtime.distributed:
        init_process_group(env, runtime.backend)
    package_log = logging.getLogger("mdfnet_hydra")
    if not runtime.is_main:
        package_log.setLevel(logging.WARNING)
    elif package_log.level == logging.NOTSET:
        package_log.setLevel(logging.INFO)  # progress even outside Hydra's logging setup
    # every rank reads (checkpoints to resume or continue from) where rank 0 writes
    run_dir = Path(broadcast_from_main(str(cfg.paths.run_dir)))
    with ExitStack() as held:
        try:
            if claim_run_dir:
                _claim_for_all_ranks(cfg, runtime, run_dir, held)
            handler = attach_log_file(run_dir / "logs" / "train.log") if runtime.is_main else None
            try:
                refuse_differing_configs(to_plain(cfg))  # before any work: nodes started alike
                return _run(cfg, runtime, run_dir, evaluate_at_end, pruning)
            except BaseException as err:
                log_failure(handler, err)  # the console has Hydra's traceback; the run's own log gets it too
                raise
            finally:
                detach_log_file(handler)
        finally:
            destroy_process_group()


def _claim_for_all_ranks(cfg: DictConfig, runtime: Runtime, run_dir: Path, held: ExitStack) -> None:
    """Rank 0 claims the run directory; a refusal reaches every rank, so none waits for the others."""
    refusal = ""
    if runtime.is_main:
        try:
            held.enter_context(claim(cfg, run_dir))
        except (RunDirectoryBusy, RunDirectoryConflict) as err:
            refusal = f"{type(err).__name__}: {err}"
            if not runtime.distributed:
                raise
    refusal = broadcast_from_main(refusal)
    if refusal:
        raise RunDirectoryConflict(refusal)


def _run(
    cfg: DictConfig, runtime: Runtime, run_dir: Path, evaluate_at_end: bool, pruning: PruningTarget | None
) -> dict[str, Any]:
    warnings = _announce(cfg, runtime)
    seed_everything(int(cfg.seed))
    if runtime.is_main:
        remove_stale_temporaries(run_dir)  # of writers killed earlier (this job holds the directory)
        resolve_root(cfg.data)  # generate the synthetic dataset once, not on every rank
    barrier()
    init = _initial_checkpoint(cfg, modality_names(cfg))
    job = open_job(cfg, state=init["preprocessing"] if init else None, first=main_first(runtime.is_main))
    log.info("data %s: %s", job.root, ", ".join(f"{k} {len(v)}" for k, v in job.splits.items()))
    for text in label_warnings(job.splits):
        if runtime.is_main:  # the same on every rank: said once
            log.warning("%s", text)
        warnings.append(text)
    results = _train_phases(job, runtime, run_dir, init, _reporter(pruning, runtime))
    summary = summarise_job(results)
    if runtime.is_main:
        write_text(run_dir / "metrics.json", json.dumps(summary, indent=2, allow_nan=False))  # undefined: null
        evaluation = None
        if len(results) > 1 and cfg.evaluation.on_finish and evaluate_at_end:
            evaluation = evaluate_quietly(run_dir, run_dir / "evaluation", cfg.evaluation)
        log.info("\n%s", format_summary(results, run_dir, evaluation, warnings))
    return summary


def _announce(cfg: DictConfig, runtime: Runtime) -> list[str]:
    """The job's first lines: what runs, where, with which batch and settings; then its warnings
    (returned: the summary repeats them)."""
    log.info(
        "mdfnet-hydra: modality %s (%s), stages %s, data %s",
        cfg.modality.name,
        ", ".join(modality_names(cfg)),
        " -> ".join(s.value for s in cfg.stage.run),
        cfg.data.name,
    )
    per_device = runtime.per_device_batch(cfg.trainer)
    log.info("%s", runtime.describe())
    log.info(
        "effective batch %d = %d per device x %d worker(s) x %d accumulation step(s)",
        per_device * runtime.world_size * cfg.trainer.grad_accum,
        per_device,
        runtime.world_size,
        cfg.trainer.grad_accum,
    )
    log.info("%s", describe_training(cfg, runtime))
    warnings = start_warnings(cfg)
    for text in warnings if runtime.is_main else ():  # the same on every rank: said once
        log.warning("%s", text)
    return warnings


def _reporter(pruning: PruningTarget | None, runtime: Runtime) -> Callable[[float | None, int], bool] | None:
    """The sweep trial's report on rank 0; the other ranks learn its decision from rank 0."""
    if pruning is None:
        return None
    if not runtime.is_main:
        return lambda value, step: False
    from mdfnet_hydra.pruning import TrialReporter

    return TrialReporter(pruning).report


def _train_phases(
    job: Job, runtime: Runtime, run_dir: Path, init: dict | None, report: Callable[[float | None, int], bool] | None
) -> dict[str, dict[str, Any]]:
    """Each phase of `stage.run` in turn, each starting from the previous one's selected checkpoint
    (the first from `stage.init_from`); a complete phase is skipped, a spent time budget stops, and
    so does a trial the sweep's pruner stopped (`report`: its epochs are steps after the earlier
    phases' configured epochs)."""
    cfg = job.cfg
    rare = _rare_labels(cfg, job.splits["train"])
    extras = {
        "modalities": job.modalities,
        "label_names": list(CHEXPERT_LABELS),
        "preprocessing": job.prep.state(),
        "config": to_plain(cfg),
        DIGEST_KEY: _encoder_digests(job, runtime),
    }
    start_from: Path | dict | None = init  # the checkpoint (or its path) the next phase starts from
    start_file = Path(cfg.stage.init_from) if init else None  # ... and the file it came from
    budget = parse_duration(cfg.trainer.max_time)
    has_test = len(job.datasets.get("test", ())) > 0
    results: dict[str, dict[str, Any]] = {}
    phases = [s.value for s in cfg.stage.run]
    for index, name in enumerate(phases):
        directory = run_dir / name
        step_offset = sum(int(cfg.phases[p].epochs) for p in phases[:index])
        spent = sum(r["wall_time_s"] for r in results.values())
        phase_budget = None if budget is None else budget - spent
        digest = file_digest(start_file) if start_file is not None and runtime.is_main else None
        # rank 0 looks at the files and decides; every rank follows
        finished = _status_for_all_ranks(runtime, directory, digest, extras[DIGEST_KEY], cfg)
        reopen = _reopen(cfg, name, finished, phase_budget, has_test) if finished is not None else None
        # a phase that trainer.max_time stopped spent the job's budget: no later phase
        out_of_time = budget is not None and (
            spent >= budget or any(_time_stopped(cfg, n, r) for n, r in results.items())
        )
        if finished is not None and reopen is None:
            log.info("%s: already complete in %s, skipping", name, directory)
            if _time_stopped(cfg, name, finished) and runtime.is_main:
                log.warning("%s", _time_stop_note(cfg, name, finished))
            if not cfg.trainer.resume:
                log.warning(
                    "%s: trainer.resume=false restarts an unfinished stage only; this one is complete and kept "
                    "(move %s away to train it again)",
                    name,
                    directory,
                )
            results[name] = finished
        elif out_of_time and (reopen is None or reopen[0] != "test"):
            log.info("%s: skipped, trainer.max_time (%gs) is spent", name, budget)
            break
        else:
            if reopen is not None:
                log.info("%s", reopen[1])
            if reopen is not None and reopen[0] == "train" and runtime.is_main:
                # no longer complete while it trains on: a continuation that dies is resumed, not taken
                # for the earlier result beside newer best checkpoints
                done = directory / "metrics.json"
                if done.is_file():
                    done.replace(directory / "metrics.before-continuing.json")
            results[name] = _train_phase(
                job,
                name,
                runtime,
                directory,
                start_from,
                rare,
                {**extras, "started_from_sha256": digest},
                phase_budget,
                report,
                step_offset,
                test_for=finished if reopen is not None and reopen[0] == "test" else None,
            )
        if results[name]["selected_checkpoint"] is None:
            break  # no epoch finished within the time budget
        if results[name].get("stopped_by") == "pruned":
            break  # the sweep's pruner stopped the trial: no later stage
        start_from = start_file = directory / "checkpoints" / f"{results[name]['selected_checkpoint']}.pth"
    return results


def _status_for_all_ranks(
    runtime: Runtime, directory: Path, digest: str | None, encoders: dict[str, dict[str, str]], cfg: DictConfig
) -> dict[str, Any] | None:
    """Rank 0's `phase_status`, or its refusal, on every rank (none waits for a rank that stopped)."""
    status: dict[str, Any] = {}
    if runtime.is_main:
        try:
            status = {"result": phase_status(directory, digest, encoders, cfg)}
        except ConfigError as err:
            status = {"refuse": str(err)}
    status = json.loads(broadcast_from_main(json.dumps(status)))
    if "refuse" in status:
        raise ConfigError(status["refuse"])
    return status["result"]


def _train_phase(
    job: Job,
    name: str,
    runtime: Runtime,
    directory: Path,
    start_from: Path | dict | None,
    rare: list[int],
    extras: dict[str, Any],
    time_budget_s: float | None,
    report: Callable[[float | None, int], bool] | None = None,
    step_offset: int = 0,
    test_for: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the phase, or (`test_for`: its recorded result) only evaluate its test split."""
    cfg = job.cfg
    if runtime.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(int(cfg.seed))
    model = job.build_model()
    if start_from is not None:
        ckpt = load_checkpoint(start_from) if isinstance(start_from, Path) else start_from
        source = start_from if isinstance(start_from, Path) else f"stage.init_from={cfg.stage.init_from}"
        load_weights(model, ckpt, source, to_plain(cfg.model))
    datasets = _phase_datasets(cfg, name, job.modalities, model, job.datasets, runtime, job.prep)
    trainer = PhaseTrainer(
        cfg,
        name,
        model,
        datasets,
        job.collator,
        runtime,
        directory,
        rare,
        extras,
        time_budget_s=time_budget_s,
        report=report,
        step_offset=step_offset,
    )
    return trainer.fit(test_for=test_for)


def _reopen(
    cfg: DictConfig, name: str, result: dict[str, Any], budget_s: float | None, has_test: bool
) -> tuple[str, str] | None:
    """Why a complete phase runs again, ("train" | "test", the log line), or None (kept as it is).

    A phase that trainer.max_time stopped before its last epoch continues, from its last checkpoint,
    when this job gives it more time than it had (its recorded budget); one finished with
    trainer.eval_test=false has its test split evaluated from its selected checkpoint when this job
    asks for it."""
    if _time_stopped(cfg, name, result):
        had = result.get("time_budget_s")
        had = float(result.get("wall_time_s") or 0.0) if had is None else float(had)
        if budget_s is None or budget_s > had:
            now = "no time limit" if budget_s is None else f"{budget_s:g}s"
            return "train", (
                f"{name}: stopped by trainer.max_time ({had:g}s) after {result.get('epochs_run')} of "
                f"{int(cfg.phases[name].epochs)} epochs in an earlier job: "
                + (
                    f"continuing it{' from its last checkpoint' if result.get('epochs_run') else ''} with {now}"
                    if cfg.trainer.resume
                    else f"training it again from the start with {now} (trainer.resume=false)"
                )
            )
    if cfg.trainer.eval_test and has_test and result.get("test") is None and result.get("selected_checkpoint"):
        return "test", (
            f"{name}: complete, but its test split was not evaluated (trainer.eval_test=false when it finished): "
            f"evaluating its {result['selected_checkpoint']} checkpoint on it now"
        )
    return None


def _time_stopped(cfg: DictConfig, name: str, result: dict[str, Any]) -> bool:
    """Whether trainer.max_time stopped the phase before its last epoch."""
    return result.get("stopped_by") == "max_time" and int(result.get("epochs_run") or 0) < int(cfg.phases[name].epochs)


def _time_stop_note(cfg: DictConfig, name: str, result: dict[str, Any]) -> str:
    """Why a rerun left a time-stopped phase as it was, and how to continue it."""
    had = result.get("time_budget_s")
    return (
        f"{name}: stopped by trainer.max_time{'' if had is None else f' ({float(had):g}s)'} after "
        f"{result.get('epochs_run')} of {int(cfg.phases[name].epochs)} epochs, and this job gives it no more time: "
        f"kept as it is. Rerun with a larger trainer.max_time (or trainer.max_time=null) to train its remaining "
        f"epochs{' from its last checkpoint' if result.get('epochs_run') else ''}"
    )


def describe_training(cfg: DictConfig, runtime: Runtime) -> str:
    """One line with the settings a reader compares runs by, stated once at the start of the job."""
    clip = cfg.trainer.max_grad_norm
    return (
        f"optimizer {describe_optimizer_config(cfg.optimizer)} | loss {describe_loss(cfg.loss)} | "
        f"gradient clipping {'max_grad_norm ' + format(float(clip), 'g') if clip is not None else 'off'} | "
        f"precision {runtime.precision.value} | seed {cfg.seed}"
    )


def start_warnings(cfg: DictConfig) -> list[str]:
    """What this job does that its user may not expect; logged at start and repeated in the summary."""
    warnings = []
    if [s.value for s in cfg.stage.run][:1] == ["stage2"] and not cfg.stage.init_from:
        warnings.append(
            "stage 2 starts from an untrained fusion and head (stage=stage2 without stage.init_from): to start from "
            "stage 1, pass stage.init_from=<run>/stage1/checkpoints/best_mean.pth, or run both with stage=two_stage"
        )
    return warnings


PHASE_RESULT_KEYS = ("stage", "selected_checkpoint", "val", "test", "wall_time_s")


def _encoder_digests(job: Job, runtime: Runtime) -> dict[str, dict[str, str]]:
    """The file digests of the job's pretrained encoders (models/sources.py), read by rank 0 (every
    rank records rank 0's); {} at no cost when none is pretrained."""
    from mdfnet_hydra.models.sources import encoder_digests, pretrained_modalities

    if not pretrained_modalities(job.cfg.model, job.modalities):
        return {}
    started = time.perf_counter()
    digests = encoder_digests(job.cfg.model, job.modalities) if runtime.is_main else None
    if runtime.is_main:
        log.info(
            "pretrained encoders: %s (file digests in %.1fs)",
            ", ".join(f"{m} weights {d['weights'][:12]}" for m, d in digests.items()) or "not readable yet",
            time.perf_counter() - started,
        )
    return json.loads(broadcast_from_main(json.dumps(digests)))


def phase_status(
    directory: Path,
    started_from: str | None,
    encoders: dict[str, dict[str, str]] | None = None,
    cfg: DictConfig | None = None,
) -> dict[str, Any] | None:
    """The phase's result if it is complete, else None (it runs, resuming where it can).

    A phase trained from another start than this job's (stage 1 trained again since stage 2
    started from its best) is out of date: its results are moved aside and it runs afresh. A
    complete phase trained from other contents of a pretrained encoder directory (`encoders`: this
    job's digests; its weights count only where the phase did not start from a checkpoint) is
    refused: its results are not this job's, and retraining would replace them."""
    recorded = _recorded_start(directory)
    if started_from is not None and recorded is not None and recorded != started_from:
        aside = move_aside(directory)
        log.warning(
            "%s started from another checkpoint than this job's (sha256 %s..., now %s...): training it "
            "again; the earlier results are in %s",
            directory.name,
            recorded[:12],
            started_from[:12],
            aside,
        )
        return None
    result = completed_phase(directory)
    if result is not None and encoders:
        refuse_changed_encoders(
            f"{directory.name} in {directory.parent} is complete, but it",
            result.get(DIGEST_KEY),
            encoders,
            cfg.model,
            f"give this job another run directory (hydra.run.dir=...), or move {directory} out of "
            f"{directory.parent} to train it again",
            from_checkpoint=started_from is not None,
        )
    return result


def _recorded_start(directory: Path) -> str | None:
    """The digest of the checkpoint a phase started from, as its result or its `last` records it."""
    try:
        return json.loads((directory / "metrics.json").read_text()).get("started_from_sha256")
    except (OSError, ValueError, AttributeError):
        pass
    last = directory / "checkpoints" / "last.pth"
    if last.is_file():
        try:
            return load_checkpoint(last, mmap=True).get("started_from_sha256")
        except DamagedFileError:
            return None
    return None


def completed_phase(directory: Path) -> dict[str, Any] | None:
    """The phase's result when every file it left parses: metrics.json, its selected checkpoint
    and saved predictions. Anything less is not complete: the phase runs again, resuming from its
    checkpoints (a damaged file is named in the log)."""
    done = directory / "metrics.json"
    if not done.is_file():
        return None
    try:
        result = json.loads(done.read_text(), parse_constant=_not_a_number)
        missing = [k for k in PHASE_RESULT_KEYS if k not in result]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        log.warning("%s is damaged (%s): finishing %s again from its checkpoints", done, err, directory.name)
        return None
    damaged = [p for p in _phase_files(directory, result) if not is_readable(p)]
    if damaged:
        log.warning(
            "%s: %s missing or damaged: finishing the stage again from its checkpoints",
            directory.name,
            ", ".join(str(p) for p in damaged),
        )
        return None
    return result


def _not_a_number(name: str) -> None:
    """A NaN / Infinity in a stage's result: a diverged stage that an older version recorded as
    complete. Finishing it again stops at its non-finite predictions (trainer.TrainingDiverged)."""
    raise ValueError(f"it holds {name}, not a result")


def _phase_files(directory: Path, result: dict[str, Any]) -> list[Path]:
    files = []
    if result.get("selected_checkpoint"):
        files.append(directory / "checkpoints" / f"{result['selected_checkpoint']}.pth")
    files += [directory / "predictions" / f"{split}.npz" for split in ("val", "test") if result.get(split)]
    return files


def _phase_datasets(
    cfg: DictConfig, name: str, modalities: list[str], model, datasets: dict, runtime: Runtime, prep: Preprocessing
) -> dict:
    """The phase's datasets: from the frozen-encoder feature cache where it applies."""
    from mdfnet_hydra.data.feature_cache import cached_datasets, feature_cache_applies

    applies, reason = feature_cache_applies(cfg, name, modalities)
    if not applies:
        if reason:
            log.info("%s: inputs encoded every step (%s)", name, reason)
        return datasets
    model.to(runtime.device).set_encoders_frozen(True)
    return cached_datasets(model, datasets, cfg, runtime, prep.pad_id)


def summarise_job(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The job's result: the last stage that produced validation metrics (NaN objective if none);
    under trainer.max_time the best so far, `final_stage` naming its stage (docs/sweeps.md)."""
    evaluated = [name for name, r in results.items() if r.get("val")]
    final = evaluated[-1] if evaluated else None
    val = results[final]["val"] if final else {}
    pruned = next(
        (
            {"stage": name, "epoch": r["epochs_run"], "step": r.get("step_offset", 0) + r["epochs_run"]}
            for name, r in results.items()
            if r.get("stopped_by") == "pruned"
        ),
        None,
    )
    return {
        "objective": val.get("auroc_mean"),
        "objective_name": "val auroc_mean",
        "auroc_min": val.get("auroc_min"),
        "final_stage": final,
        "pruned": pruned,  # where the sweep's pruner stopped the trial (pruning.py), or None
        "stages": results,
    }


def _initial_checkpoint(cfg: DictConfig, modalities: list[str]) -> dict | None:
    if not cfg.stage.init_from:
        return None
    ckpt = load_checkpoint(cfg.stage.init_from)
    if ckpt.get("modalities") != modalities:
        raise ConfigError(
            f"stage.init_from={cfg.stage.init_from} was trained with modalities {ckpt.get('modalities')}, "
            f"but modality={cfg.modality.name} uses {modalities}"
        )
    differing = model_settings_differences(
        ckpt.get("config"), to_plain(cfg.model), _weight_settings(cfg.model, modalities)
    )
    if differing:
        raise ConfigError(
            f"stage.init_from={cfg.stage.init_from} was trained with {', '.join(differing)}: its weights do not "
            f"fit this model; pass the model settings it was trained with"
        )
    log.info("initialising from %s (stage %s, epoch %s)", cfg.stage.init_from, ckpt.get("stage"), ckpt.get("epoch"))
    return ckpt


def _weight_settings(cfg_model: DictConfig, modalities: list[str]) -> tuple[str, ...]:
    """The model settings of the project's own layers that decide which weights a model holds and
    their shapes; a checkpoint that differs in one cannot start this job's model. Others may differ
    from stage 1's (dropouts, how the text encoder runs); the encoders' own architecture is checked
    against their weights when they load (`load_weights`: `biomedclip` and `biomedclip_arch` fit)."""
    keys = ["fusion.kind", "fusion.dim", "head.hidden_dim"]
    keys += ["fusion.layers"] if cfg_model.fusion.kind == "attention" else []  # concat has no layers
    keys += ["clinical.hidden_dims"] if "clinical" in modalities else []
    keys += [f"{m}.output" for m in ("vision", "text") if m in modalities]  # a pooling layer or none
    return tuple(f"model.{key}" for key in keys)


def _rare_labels(cfg: DictConfig, train: SplitData) -> list[int]:
    chosen = list(cfg.trainer.checkpoint.rare_labels)
    if chosen:
        return [CHEXPERT_LABELS.index(name) for name in chosen]
    return rarest_labels(train.targets, train.mask, int(cfg.trainer.checkpoint.num_rare))
