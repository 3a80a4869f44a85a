"""One training phase (stage 1 or stage 2) as a plain PyTorch loop.

Per epoch: train with gradient accumulation, evaluate on the whole validation split, log to
TensorBoard, keep `last` / best / periodic checkpoints, stop early on validation mean AUROC. At
the end the selected best checkpoint is reloaded and evaluated on validation and test, and its
predictions are saved for later evaluation.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mdfnet_hydra.checkpoint import CheckpointManager, is_readable, load_checkpoint, load_weights, move_aside
from mdfnet_hydra.compiling import CompilePlan, compile_counts
from mdfnet_hydra.config import CheckpointName, ConfigError, PhaseConfig, Precision, RefusedOnEveryTry, to_plain
from mdfnet_hydra.data.dataset import MultimodalDataset
from mdfnet_hydra.data.loading import describe_loader, loader_settings
from mdfnet_hydra.distributed import all_gather_rows, barrier, broadcast_from_main, mean_over_ranks
from mdfnet_hydra.files import DamagedFileError, write_text
from mdfnet_hydra.labels import CHEXPERT_LABELS, tag_name
from mdfnet_hydra.losses import MultiLabelLoss
from mdfnet_hydra.metrics import compute_metrics
from mdfnet_hydra.models.mdfnet import MDFNet
from mdfnet_hydra.models.sources import DIGEST_KEY, refuse_changed_encoders
from mdfnet_hydra.optim import build_optimizer, build_scheduler
from mdfnet_hydra.predictions import save_predictions
from mdfnet_hydra.run_directory import job_identity, job_restart
from mdfnet_hydra.runtime import Runtime
from mdfnet_hydra.step import TrainingStep, to_device
from mdfnet_hydra.tracking import Tracker

log = logging.getLogger(__name__)

# the stage's record (JSON) of the job whose start `trainer.resume=false` restarted it (run_directory.job_identity)
RESTARTED_BY = ".restarted-by-job"
# metric key in compute_metrics' output that each best checkpoint maximises
BEST_MONITORS = {
    CheckpointName.best_mean.value: "auroc_mean",
    CheckpointName.best_auroc.value: "auroc_micro",
    CheckpointName.best_rare.value: "auroc_rare",
}
# an epoch whose training loop waited for batches longer than this share says the input pipeline is slow
DATA_WAIT_WARN = 0.25


class TrainingDiverged(RefusedOnEveryTry, FloatingPointError):
    """The training loss or the predictions became NaN or infinite (a learning rate too high, no
    gradient clipping, fp16 overflow). The same config and seed diverge again on every try, so the
    CLI prints its one line and restarted data-parallel workers stop at once (launch.py); a sweep
    records the trial as failed with it. Raised on every rank alike (the values checked are
    all-reduced or gathered), before anything of the diverged epoch is saved."""


@dataclass
class Best:
    value: Optional[float] = None
    epoch: Optional[int] = None


@dataclass
class PhaseState:
    """What `last.pth` must restore besides model / optimizer / scheduler to resume exactly."""

    epoch: int = 0
    global_step: int = 0
    bad_epochs: int = 0
    best: dict[str, Best] = field(default_factory=lambda: {k: Best() for k in BEST_MONITORS})
    elapsed_s: float = 0.0
    # what the schedule was built for: a resume must step the same way (None in older checkpoints)
    effective_batch_size: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    precision: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PhaseState":
        state = cls(**{k: v for k, v in d.items() if k != "best"})
        state.best = {k: Best(**v) for k, v in d["best"].items()}
        return state


class TimedBatches:
    """A loader's batches, adding up the seconds the training loop waits for each one after the
    first (which also starts the workers): a step that waits is fed too slowly."""

    def __init__(self, loader: DataLoader, limit: int) -> None:
        self.loader, self.limit = loader, limit
        self.waited = 0.0
        self.first_at: Optional[float] = None  # when the first batch arrived

    def __iter__(self):
        batches = itertools.islice(self.loader, self.limit)  # never loads (or waits for) one batch more
        while True:
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            if self.first_at is None:
                self.first_at = time.perf_counter()
            else:
                self.waited += time.perf_counter() - asked
            yield batch

    def share(self) -> float:
        """The share of the loop since the first batch spent waiting for the others."""
        if self.first_at is None:
            return 0.0
        return self.waited / max(time.perf_counter() - self.first_at, 1e-9)


@dataclass
class Prediction:
    probs: np.ndarray
    loss: float
    indices: np.ndarray
    non_finite: int = 0  # logits that are NaN or infinite (a diverged model)


class PhaseTrainer:
    def __init__(
        self,
        cfg: DictConfig,
        phase_name: str,
        model: MDFNet,
        datasets: dict[str, MultimodalDataset],
        collate,
        runtime: Runtime,
        directory: Path,
        rare: list[int],
        checkpoint_extras: dict[str, Any],
        time_budget_s: Optional[float] = None,
        report: Optional[Callable[[Optional[float], int], bool]] = None,
        step_offset: int = 0,
    ) -> None:
        self.cfg = cfg
        self.name = phase_name
        self.phase: PhaseConfig = cfg.phases[phase_name]
        self.trainer_cfg = cfg.trainer
        self.runtime = runtime
        self.directory = directory
        self.rare = rare
        self.extras = checkpoint_extras
        self.time_budget_s = time_budget_s  # what is left of trainer.max_time for this phase
        self.out_of_time = False
        # the epoch the time budget cut short, {epoch, steps_done, steps, seconds}: its steps are discarded
        self.unfinished: Optional[dict[str, Any]] = None
        # a sweep trial's pruning (pruning.py): report(val mean AUROC, step) -> stop; called on every
        # rank (rank 0 reports), epochs numbered from step_offset + 1 (the earlier stages' epochs)
        self.report, self.step_offset, self.pruned = report, int(step_offset), False
        self.datasets = datasets
        self.model = model.to(runtime.device)
        self.model.set_encoders_frozen(bool(self.phase.freeze_encoders))
        self.per_device_batch = runtime.per_device_batch(cfg.trainer)
        # Frozen parameters (stage 1 encoders) have requires_grad=False, so DDP leaves them out of
        # its gradient buckets: no all-reduce traffic for weights that do not train.
        self.forward = self._wrap_ddp() if runtime.distributed else self.model
        self.data_wait_share = 0.0  # of the last epoch's training loop (TimedBatches)
        self.epoch_lrs: dict[str, float] = {}  # each group's learning rate at the last epoch's last step
        self.compiled_from: Optional[dict[str, int]] = None  # torch's compile counters when compiling began
        self.compile_plan = (
            CompilePlan.of(
                self.trainer_cfg.compile_mode, cfg.model.text.length_buckets, text="text" in self.model.modalities
            )
            if self.trainer_cfg.compile
            else None
        )
        self.loss_fn = MultiLabelLoss(cfg.loss)
        self.loaders = self._loaders(collate)
        n_batches = self.batches_available = self._train_batches_per_epoch()
        self.accum = int(self.trainer_cfg.grad_accum)
        self.steps_per_epoch = n_batches // self.accum
        self.batches_per_epoch = self.steps_per_epoch * self.accum
        self.optimizer = build_optimizer(self.model, self.phase, cfg.optimizer, fused=runtime.fused_optimizer)
        self.scheduler = build_scheduler(
            self.optimizer,
            cfg.scheduler,
            warmup_steps=int(self.phase.warmup_epochs) * self.steps_per_epoch,
            total_steps=int(self.phase.epochs) * self.steps_per_epoch,
        )
        self.step = TrainingStep(
            self.forward,
            self.optimizer,
            self.loss_fn,
            runtime,
            accumulation=self.accum,
            max_grad_norm=self.trainer_cfg.max_grad_norm,
            scheduler=self.scheduler,
            compile_plan=self.compile_plan,
            compile_loss=bool(self.trainer_cfg.compile_loss),
            foreach=bool(self.trainer_cfg.grad_accum_foreach),
        )
        if self.compile_plan is not None:
            self._log_compile_plan()
            self.compiled_from = compile_counts()
        if self.step.own_grads:
            log.info(
                "%s: CUDA graphs with %d-batch accumulation: each window's first gradients are copied out of "
                "the graphs' memory, which the next batch's replay overwrites, and summed outside autograd",
                self.name,
                self.accum,
            )
        self.scaler = self.step.scaler  # saved in and restored from full checkpoints
        self.checkpoints = CheckpointManager(
            directory / "checkpoints",
            int(self.trainer_cfg.checkpoint.every_n_epochs),
            int(self.trainer_cfg.checkpoint.keep_last),
            enabled=runtime.is_main,
        )
        self._resume_state: Optional[dict[str, Any]] = None  # rank 0's loaded resume state
        self._resumed_metrics: Optional[dict[str, Any]] = None  # the resumed epoch's validation numbers
        self.state = PhaseState(
            effective_batch_size=self.effective_batch_size,
            steps_per_epoch=self.steps_per_epoch,
            precision=runtime.precision.value,
        )

    # ------------------------------------------------------------------ setup
    def _train_batches_per_epoch(self) -> int:
        """Each worker's training batches per epoch. Refused: none (the split is smaller than the
        batch in force), or fewer than trainer.grad_accum (a shorter window would step with a
        smaller effective batch than the job states)."""
        tc, world, per_device = self.trainer_cfg, self.runtime.world_size, self.per_device_batch
        samples, n_batches = len(self.datasets["train"]), len(self.loaders["train"])
        batch = f"{per_device * world} = {per_device} per device x {world} workers" if world > 1 else f"{per_device}"
        if tc.global_batch_size is not None:
            smaller = "lower trainer.global_batch_size"
        else:
            smaller = "lower trainer.batch_size (per device)" + (" or use fewer workers" if world > 1 else "")
        if n_batches == 0:
            raise RefusedOnEveryTry(
                f"the training split ({samples} samples) is smaller than one batch ({batch}); {smaller}"
            )
        limit = tc.limit_train_batches
        if limit and int(limit) < n_batches:
            n_batches, source = int(limit), f"trainer.limit_train_batches={limit}"
        else:
            source = f"the training split ({samples} samples) in batches of {batch}"
        accum = int(tc.grad_accum)
        self.batches_source = source  # what set the batch count (the start lines name it)
        if n_batches < accum:
            raise RefusedOnEveryTry(
                f"trainer.grad_accum={accum} needs {accum} batches per epoch, but {source} gives {n_batches} "
                f"per worker: the effective batch would be {per_device * world * n_batches}, not "
                f"{per_device * world * accum}; lower trainer.grad_accum to {n_batches} or "
                + ("raise trainer.limit_train_batches" if source.startswith("trainer.") else smaller)
            )
        return n_batches

    def _log_compile_plan(self) -> None:
        """How the step compiled itself (step.py)."""
        plan = self.compile_plan
        log.info(
            "%s: training steps through torch.compile (mode %s, %s, %s; the first steps compile)",
            self.name,
            plan.mode,
            plan.describe_shapes(),
            (
                "the model and the loss (DDP's forward between them eager; the loss's graphs on top of those)"
                if self.runtime.distributed
                else "the loss in the model's graph"
            )
            if self.step.loss_in_graph
            else "the model alone, the loss eager",
        )

    def _compile_note(self) -> str:
        """What compiling has done so far in this phase (empty when the forward is not compiled)."""
        if self.compiled_from is None:
            return ""
        now = {k: v - self.compiled_from[k] for k, v in compile_counts().items()}
        note = f"; compiled graphs {now['graphs']}, graph breaks {now['graph_breaks']}"
        if self.compile_plan.records_graphs_on(self.runtime.device):  # (on a CPU no graph is captured)
            note += f", not captured as CUDA graphs {now['cudagraph_skips']}"
        return note

    def _wrap_ddp(self) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _loaders(self, collate) -> dict[str, DataLoader]:
        """Seeded DistributedSampler shards (num_replicas=1 alone), so one worker with the global
        batch sees exactly the samples that N workers with global / N each see together."""
        from torch.utils.data import DistributedSampler

        rt, seed = self.runtime, int(self.cfg.seed)
        train_sampler = DistributedSampler(
            self.datasets["train"], num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=seed, drop_last=True
        )
        settings = loader_settings(self.cfg.data, rt, self.datasets["train"], seed=seed)
        loaders = {
            "train": DataLoader(
                self.datasets["train"],
                batch_size=self.per_device_batch,
                sampler=train_sampler,
                drop_last=True,
                collate_fn=collate,
                **settings,
            )
        }
        for split in ("val", "test"):
            if split in self.datasets and len(self.datasets[split]):
                # padded by repetition to equal shards; the duplicates are dropped after gathering
                sampler = DistributedSampler(
                    self.datasets[split], num_replicas=rt.world_size, rank=rt.rank, shuffle=False
                )
                # validation runs every epoch (workers kept); the test split once at the end
                settings = loader_settings(
                    self.cfg.data, rt, self.datasets[split], persistent=split == "val", seed=seed
                )
                loaders[split] = DataLoader(
                    self.datasets[split],
                    batch_size=self.per_device_batch,
                    sampler=sampler,
                    # evaluation runs eagerly: no length buckets (padding only to the batch's longest)
                    collate_fn=collate.without_buckets() if hasattr(collate, "without_buckets") else collate,
                    **settings,
                )
        return loaders

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch * self.runtime.world_size * self.accum

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_device(batch, self.runtime.device)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, metrics: Optional[dict], full: bool) -> dict[str, Any]:
        state = {
            "format": 1,
            "stage": self.name,
            "epoch": self.state.epoch,
            "model": self.model.state_dict(),
            "metrics": _scalars(metrics or {}),
            **self.extras,
        }
        if full:
            state.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                trainer_state=self.state.to_dict(),
                torch_rng=torch.get_rng_state(),
            )
        return state

    def _try_resume(self) -> None:
        """Continue from the newest valid full state (`last`, else the newest `epoch_NNN`).

        Rank 0 decides and every rank follows (on a shared file system ranks could otherwise see
        different files and train different epochs). A stage directory that holds checkpoints but
        no usable state is refused rather than trained over from the start, which would overwrite
        its results; `trainer.resume=false` does that deliberately."""
        decision = json.loads(broadcast_from_main(json.dumps(self._resume_decision() if self.runtime.is_main else {})))
        if decision.get("refuse"):
            raise (ConfigError if decision.get("user") else DamagedFileError)(decision["refuse"])
        if not decision.get("path"):
            return
        path = Path(decision["path"])
        ckpt = self._resume_state if self.runtime.is_main else load_checkpoint(path)
        self._resume_state = None
        load_weights(self.model, ckpt, path, to_plain(self.cfg.model))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        resumed = PhaseState.from_dict(ckpt["trainer_state"])
        resumed.effective_batch_size, resumed.steps_per_epoch = self.effective_batch_size, self.steps_per_epoch
        resumed.precision = self.runtime.precision.value
        self.state = resumed
        self._resumed_metrics = dict(ckpt.get("metrics") or {})
        self.state.best.update({k: Best(**v) for k, v in decision.get("best", {}).items()})
        torch.set_rng_state(ckpt["torch_rng"])
        log.info("%s: resumed from %s after epoch %d", self.name, path, self.state.epoch)

    def _resume_decision(self) -> dict[str, Any]:
        """Rank 0: {"path": state to resume} | {"refuse": message} | {} (start the phase afresh)."""
        self._resume_state = None
        existing = self.checkpoints.existing()
        if not self.trainer_cfg.resume and not self._restarts_this_job():
            if existing:
                aside = move_aside(self.directory)
                log.warning(
                    "%s: trainer.resume=false: training from the start; the earlier results are in %s", self.name, aside
                )
            identity = job_identity()
            if any(identity.values()):  # what a restart of this job compares itself with
                write_text(self.directory / RESTARTED_BY, json.dumps(identity) + "\n")
            return {}
        if not existing:
            return {}
        path, ckpt, problems = self.checkpoints.resume_state(CheckpointName.last.value)
        if ckpt is None:
            if _first_epoch_only(existing):
                log.warning(
                    "%s: %s; the stage had no finished epoch to resume: starting it again",
                    self.name,
                    "; ".join(problems),
                )
                return {}
            return {
                "refuse": (
                    f"{self.name}: cannot resume from {self.checkpoints.directory}: {'; '.join(problems)}, and no valid "
                    f"epoch_NNN checkpoint holds the training state. Its other checkpoints "
                    f"({', '.join(p.name for p in existing)}) would be overwritten by training from the start: "
                    f"set trainer.resume=false to do that (they are moved aside), or move the directory away."
                )
            }
        for problem in problems:
            log.warning("%s: %s; resuming from %s instead", self.name, problem, path.name)
        mismatch = self._schedule_mismatch(PhaseState.from_dict(ckpt["trainer_state"]), path)
        if mismatch:
            return {"refuse": mismatch}
        try:
            refuse_changed_encoders(
                f"{self.name}: {path}",
                ckpt.get(DIGEST_KEY),
                self.extras.get(DIGEST_KEY) or {},
                self.cfg.model,
                "set trainer.resume=false to train the stage again from the start (its checkpoints are moved "
                "aside), or give this job another run directory (hydra.run.dir=...)",
                from_checkpoint=self.extras.get("started_from_sha256") is not None,
            )
        except ConfigError as err:  # resuming would train on with the old encoder in the new one's features
            return {"refuse": str(err), "user": True}
        self._resume_state = ckpt
        return {"path": str(path), "best": self._bests_on_disk(int(ckpt["trainer_state"]["epoch"]))}

    def _restarts_this_job(self) -> bool:
        """Whether `trainer.resume=false` was already done by this job, which is now restarted (a
        SLURM requeue, torchrun's restart): then it resumes instead of moving its own progress aside."""
        restart = job_restart()
        if restart is None:
            return False
        what, keys = restart
        try:
            started = json.loads((self.directory / RESTARTED_BY).read_text())
        except (OSError, ValueError):
            return False  # this job never got to start the stage: its start is now
        current = job_identity()
        if current[keys[-1]] is None or any(started.get(k) != current[k] for k in keys):
            return False  # another job's record, or a counter inherited from the shell that submitted this one
        log.info("%s: trainer.resume=false restarts a job once, not at its %s: resuming", self.name, what)
        return True

    def _schedule_mismatch(self, saved: PhaseState, path: Path) -> Optional[str]:
        """Why `saved` cannot continue under this job's batch and schedule (None if it can)."""
        if saved.precision and saved.precision != self.runtime.precision.value:
            log.warning(
                "%s: %s was trained in %s, this job computes in %s",
                self.name,
                path.name,
                saved.precision,
                self.runtime.precision.value,
            )
        if saved.effective_batch_size in (None, self.effective_batch_size) and saved.steps_per_epoch in (
            None,
            self.steps_per_epoch,
        ):
            return None
        return (
            f"{self.name}: {path} was trained with effective batch {saved.effective_batch_size} "
            f"({saved.steps_per_epoch} steps per epoch); this job makes {self.effective_batch_size} "
            f"({self.steps_per_epoch} steps per epoch: {self.per_device_batch} per device x {self.runtime.world_size} "
            f"worker(s) x {self.accum} accumulation), so its learning-rate schedule would not continue. Resume on "
            f"as many devices, or fix the batch across device counts with trainer.global_batch_size"
        )

    def _bests_on_disk(self, resumed_epoch: int) -> dict[str, dict]:
        """Best checkpoints written after the resumed state (a job killed between saving a best and
        `last`, or a fall-back to an older `epoch_NNN`): the state adopts what the files hold, so
        the values it compares with, and the epoch it reports, are those of the weights on disk."""
        adopted = {}
        for name, key in BEST_MONITORS.items():
            path = self.checkpoints.path(name)
            if not path.is_file():
                continue
            try:
                saved = load_checkpoint(path, mmap=True)
            except DamagedFileError as err:
                log.warning("%s: %s; it is written again at the next improvement", self.name, err)
                continue
            epoch, value = saved.get("epoch"), (saved.get("metrics") or {}).get(key)
            if epoch is not None and int(epoch) > resumed_epoch and value is not None:
                adopted[name] = {"value": float(value), "epoch": int(epoch)}
                log.warning(
                    "%s: %s holds epoch %d, after the resumed state: kept as the best so far",
                    self.name,
                    path.name,
                    epoch,
                )
        return adopted

    # ------------------------------------------------------------------ loop
    def fit(self, test_for: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Train (resuming where the stage stopped) and finish. `test_for`: the recorded result of a
        complete stage that has no test metrics: only the test split is evaluated and added to it."""
        tracker = Tracker(self.directory, enabled=self.runtime.is_main)
        try:
            if test_for is not None:
                return self._add_test(test_for)
            self._try_resume()
            tracker.open_events(self.state.global_step)
            self._train(tracker)
            return self._finish()
        finally:
            tracker.close()
            self._release_loaders()
            for dataset in self.datasets.values():  # a feature cache held in GPU memory (feature_cache.py)
                getattr(dataset, "release", lambda: None)()

    def _release_loaders(self) -> None:
        """Stop persistent workers now (they hold memory and pinned buffers), not when the trainer
        is collected: the end-of-run evaluation starts workers of its own."""
        for loader in self.loaders.values():
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
        self.loaders = {}

    def _train(self, tracker: Tracker) -> None:
        epochs = int(self.phase.epochs)
        patience = self.phase.early_stopping_patience
        log.info(
            "%s: %d epochs (warmup %d), %s encoders, lr %s, %d steps/epoch, effective batch %d (%d per device x %d worker(s) x %d accumulation)",
            self.name,
            epochs,
            self.phase.warmup_epochs,
            "frozen" if self.phase.freeze_encoders else "trainable",
            self._describe_learning_rates(),
            self.steps_per_epoch,
            self.effective_batch_size,
            self.per_device_batch,
            self.runtime.world_size,
            self.accum,
        )
        log.info(
            "%s: %s step%s; data loading %s",
            self.name,
            describe_optimizer(self.optimizer),
            self._describe_accumulation(),
            describe_loader(self.loaders["train"]),
        )
        left_out = self.batches_available - self.batches_per_epoch
        if left_out and self.runtime.is_main:  # the same on every rank: said once
            log.warning(
                "%s: trains on %d of %d batches per epoch%s (%s): each optimizer step takes trainer.grad_accum=%d "
                "batches, leaving %d out every epoch (a shorter window would step with a smaller batch)",
                self.name,
                self.batches_per_epoch,
                self.batches_available,
                " per worker" if self.runtime.world_size > 1 else "",
                self.batches_source,
                self.accum,
                left_out,
            )
        stop = self._report_resumed_epoch()
        while (
            not stop
            and self.state.epoch < epochs
            and not (patience is not None and self.state.bad_epochs >= int(patience))
        ):
            start = time.perf_counter()
            if self._time_is_up(start):
                break
            epoch = self.state.epoch + 1
            train_loss = self._train_epoch(epoch, tracker, start)
            if self.unfinished is not None:
                break  # its steps are discarded: the stage ends on the previous epoch's checkpoints
            val = self.predict("val", limit=self.trainer_cfg.limit_val_batches)
            # before any checkpoint of the epoch: a diverged epoch never becomes `last` or a best
            self._refuse_non_finite_predictions(
                val, "val", of=f"after epoch {epoch}", so=f"no checkpoint of epoch {epoch} is saved"
            )
            metrics = self._metrics("val", val)
            self.state.epoch = epoch
            improved = self._update_best(metrics)
            self.state.elapsed_s += time.perf_counter() - start
            self._log_epoch(tracker, epoch, epochs, train_loss, val.loss, metrics, time.perf_counter() - start)
            self._save_epoch(metrics, improved)
            tracker.flush()
            pruned = self._pruned_now(metrics, epoch)  # the epoch that spends the time budget is reported too
            if self.out_of_time or pruned:
                break
        stopped_by = self._stopped_by()
        if stopped_by == "pruned":
            log.info(
                "%s: pruned after epoch %d (step %d): the sweep's pruner stops this trial; keeping its best checkpoint",
                self.name,
                self.state.epoch,
                self.step_offset + self.state.epoch,
            )
        elif stopped_by == "max_time":
            self._log_time_stop(epochs)
        elif stopped_by == "early_stopping":
            log.info(
                "%s: early stop after epoch %d (no val mean AUROC gain for %d epochs)",
                self.name,
                self.state.epoch,
                patience,
            )

    def _stopped_by(self) -> Optional[str]:
        """What ended the phase before its configured epochs (None: it ran them all)."""
        if self.pruned:
            return "pruned"
        if self.state.epoch >= int(self.phase.epochs):
            return None
        patience = self.phase.early_stopping_patience
        if self.out_of_time and not (patience is not None and self.state.bad_epochs >= int(patience)):
            return "max_time"
        return "early_stopping"

    def _log_time_stop(self, epochs: int) -> None:
        """The time budget's stop: the epochs kept, the cut epoch's discarded steps, how to continue."""
        cut = self.unfinished
        log.info(
            "%s: stopped by trainer.max_time (%gs for this stage) after %d of %d epochs%s; %s. A rerun with a "
            "larger trainer.max_time (or trainer.max_time=null) %s",
            self.name,
            self.time_budget_s,
            self.state.epoch,
            epochs,
            f" (epoch {cut['epoch']} stopped after {cut['steps_done']} of {cut['steps']} steps: those steps are "
            "discarded, not counted as an epoch)"
            if cut
            else "",
            "keeping the best checkpoint so far" if self.state.epoch else "no checkpoint to keep",
            f"continues from epoch {self.state.epoch}'s checkpoint" if self.state.epoch else "trains it",
        )

    def _describe_accumulation(self) -> str:
        """How a window's gradients add up (trainer.grad_accum_foreach), where there are windows."""
        if self.accum == 1:
            return ""
        if self.step.sums is None:
            return f"; {self.accum} batches' gradients summed by autograd (an add per parameter tensor)"
        return f"; {self.accum} batches' gradients summed outside autograd (one multi-tensor add per batch)"

    def _report_resumed_epoch(self) -> bool:
        """A job stopped after saving an epoch's `last` but before reporting it (SLURM's timeout
        signal lands anywhere) would leave that step missing from its trial, and the pruner's
        decision on it untaken: a resumed phase reports its resumed epoch again (the reporter
        skips a step the trial already holds) and stops if the pruner says so."""
        if self._resumed_metrics is None or not self.state.epoch:
            return False
        return self._pruned_now(self._resumed_metrics, self.state.epoch)

    def _pruned_now(self, metrics: dict, epoch: int) -> bool:
        """Report the epoch to the sweep's trial; rank 0 asks the pruner and every rank follows."""
        if self.report is None:
            return False
        decision = self.report(metrics.get("auroc_mean"), self.step_offset + epoch) if self.runtime.is_main else False
        self.pruned = broadcast_from_main("stop" if decision else "") == "stop"
        return self.pruned

    def _describe_learning_rates(self) -> str:
        """The scheduled peak rate of each group (what the config set), and where warmup starts:
        the optimizer's current rates at this point are warmup's first, not the phase's."""
        peaks = ", ".join(f"{g['name']} {g['initial_lr']:.1e}" for g in self.optimizer.param_groups)
        warmup = int(self.phase.warmup_epochs)
        if warmup and self.state.global_step == 0:
            start = float(self.cfg.scheduler.warmup_start_factor)
            return f"{peaks} (linear warmup from {start:g}x over {warmup} epoch(s), then cosine to {float(self.cfg.scheduler.min_lr_ratio):g}x)"
        return f"{peaks} (cosine to {float(self.cfg.scheduler.min_lr_ratio):g}x)"

    def _time_is_up(self, since: float) -> bool:
        """Whether the time budget is spent; the same answer on every rank (rank clocks differ)."""
        if self.time_budget_s is None:
            return False
        spent = self.state.elapsed_s + time.perf_counter() - since >= self.time_budget_s
        if self.runtime.distributed:
            import torch.distributed as dist

            flag = torch.tensor([float(spent)], device=self.runtime.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            spent = bool(flag.item())
        self.out_of_time = self.out_of_time or spent
        return spent

    def _train_epoch(self, epoch: int, tracker: Tracker, epoch_start: float) -> dict[str, float]:
        self.model.train()
        self.loaders["train"].sampler.set_epoch(epoch)
        # worker seeds from (seed, epoch): a resumed run does not replay the first epoch's (augment)
        self.loaders["train"].generator.manual_seed(int(self.cfg.seed) * 100_003 + epoch)
        device = self.runtime.device
        totals: Optional[torch.Tensor] = None  # the optimised loss and its named terms, summed on the device
        # each batch's terms since the last logging step (device tensors, no sync) and its step in the epoch:
        # the logging step reads them all back at once, naming the first non-finite one
        recent: list[torch.Tensor] = []
        recent_steps: list[int] = []
        names: list[str] = []
        batches = 0
        interval_samples, interval_start = 0, time.perf_counter()
        log_every = max(1, int(self.trainer_cfg.log_every_n_steps))
        self.optimizer.zero_grad(set_to_none=True)
        batches_in = TimedBatches(self.loaders["train"], self.batches_per_epoch)
        for i, batch in enumerate(batches_in):
            if i % self.accum == 0:  # the rates the window's optimizer step will use (Python floats: no sync)
                window_lrs = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
            step = self.state.global_step + 1
            logging_step = step % log_every == 0 or (i + 1) == self.batches_per_epoch
            batch = self._to_device(batch)
            result = self.step(batch, i, measure_norm=logging_step)
            terms = result.terms
            names = ["combined", *terms.parts]
            current = torch.stack([terms.total.detach(), *(t.detach() for t in terms.parts.values())])
            totals = current if totals is None else totals + current
            recent.append(current)
            recent_steps.append(i // self.accum + 1)
            batches += 1
            interval_samples += batch["targets"].shape[0] * self.runtime.world_size
            if not result.stepped:
                continue
            self.state.global_step = step
            self.epoch_lrs = window_lrs
            if logging_step:
                # every rank's micro-batches, not rank 0's share; host sync only at logging intervals
                losses = mean_over_ranks(torch.stack(recent)[:, 0].float()).tolist()
                self._refuse_non_finite_loss(losses, recent_steps, epoch)
                recent, recent_steps = [], []
                loss = losses[-1]  # this step's batch
                elapsed = time.perf_counter() - interval_start
                throughput = interval_samples / max(elapsed, 1e-9)
                tracker.scalar("batch/loss", loss, step)
                tracker.scalar("batch/grad_norm", float(result.grad_norm), step)
                tracker.scalar("batch/samples_per_sec", throughput, step)
                if device.type == "cuda":
                    tracker.scalar("batch/gpu_memory_gb", torch.cuda.max_memory_allocated(device) / 2**30, step)
                log.info(
                    "%s epoch %d step %d/%d | loss %.4f | grad norm %.3f | %.0f samples/s",
                    self.name,
                    epoch,
                    (i + 1) // self.accum,
                    self.steps_per_epoch,
                    loss,
                    float(result.grad_norm),
                    throughput,
                )
                interval_samples, interval_start = 0, time.perf_counter()
                if self._time_is_up(epoch_start):
                    if i + 1 < self.batches_per_epoch:  # steps left: the epoch is not finished
                        self.unfinished = {
                            "epoch": epoch,
                            "steps_done": (i + 1) // self.accum,
                            "steps": self.steps_per_epoch,
                            "seconds": round(time.perf_counter() - epoch_start, 3),
                        }
                    break
        self.data_wait_share = batches_in.share()
        if self.data_wait_share > DATA_WAIT_WARN and batches >= 4 and self.runtime.is_main:
            log.warning(
                "%s epoch %d: the step waited for input batches %.0f%% of the training loop: the input pipeline "
                "(%s), not the model, sets the pace; more data.num_workers, images pre-resized by prepare "
                "(images.size) or stage 1 from the feature cache would feed it faster",
                self.name,
                epoch,
                100 * self.data_wait_share,
                describe_loader(self.loaders["train"]),
            )
        # over every rank's batches (each rank steps through as many): the epoch's training loss
        means = mean_over_ranks(totals / max(batches, 1)).tolist() if totals is not None else []
        if not all(math.isfinite(v) for v in means):
            raise TrainingDiverged(
                f"{self.name}: training diverged: non-finite training loss in epoch {epoch} ({means}); "
                + self._divergence_advice()
            )
        return dict(zip(names, means))

    @torch.no_grad()
    def predict(self, split: str, limit: Optional[int] = None) -> Prediction:
        """Probabilities over the whole split: every rank predicts its shard, then all gather."""
        self.model.eval()
        logits, indices = [], []
        for i, batch in enumerate(self.loaders[split]):
            if limit is not None and i >= int(limit):
                break
            batch = self._to_device(batch)
            with self.runtime.autocast():
                logits.append(self.model(batch).float())
            indices.append(batch["index"])
        all_logits = all_gather_rows(torch.cat(logits)).cpu()
        all_indices = all_gather_rows(torch.cat(indices)).cpu().numpy()
        indices_unique, first = np.unique(all_indices, return_index=True)
        all_logits = all_logits[torch.from_numpy(first)]
        data = self.datasets[split]
        idx = torch.from_numpy(indices_unique)
        loss = self.loss_fn(all_logits, data.targets[idx], data.mask[idx]).total.item()
        non_finite = int((~torch.isfinite(all_logits)).sum())
        return Prediction(torch.sigmoid(all_logits).numpy(), loss, indices_unique, non_finite)

    def _refuse_non_finite_loss(self, losses: list[float], steps: list[int], epoch: int) -> None:
        """The first of a logging interval's batch losses that is NaN or infinite, named by its step."""
        first = next((k for k, v in enumerate(losses) if not math.isfinite(v)), None)
        if first is not None:
            raise TrainingDiverged(
                f"{self.name}: training diverged: the loss was first non-finite ({losses[first]}) at epoch {epoch}, "
                f"step {steps[first]}/{self.steps_per_epoch}; " + self._divergence_advice()
            )

    def _refuse_non_finite_predictions(self, pred: Prediction, split: str, of: str, so: str) -> None:
        """Predictions of a diverged model are no result: no AUROC is computed from them, nothing saved."""
        if pred.non_finite == 0 and math.isfinite(pred.loss):
            return
        raise TrainingDiverged(
            f"{self.name}: training diverged: {pred.non_finite} of {pred.probs.size} {split} predictions {of} are "
            f"NaN or infinite (loss {pred.loss}), so {so}; " + self._divergence_advice()
        )

    def _divergence_advice(self) -> str:
        """The settings that most often stop a divergence, with their values in this job."""
        phase, key = self.phase, f"phases.{self.name}"
        rates = [f"{key}.lr={phase.lr:g}"]
        rates += [f"{key}.{k}={phase[k]:g}" for k in ("lr_fusion", "lr_head") if phase[k] is not None]
        if not phase.freeze_encoders:
            rates.append(f"{key}.lr_encoders={phase.lr_encoders:g}")
        clip = self.trainer_cfg.max_grad_norm
        tips = [
            f"a lower learning rate (now {', '.join(rates)})",
            "trainer.max_grad_norm=1.0 (gradient clipping)"
            if clip is None
            else f"a lower trainer.max_grad_norm (now {clip:g})",
        ]
        if self.runtime.precision is not Precision.fp32:
            tips.append(f"trainer.precision=fp32 (now {self.runtime.precision.value})")
        return f"try {', '.join(tips[:-1])} or {tips[-1]}"

    def _metrics(self, split: str, pred: Prediction) -> dict:
        data = self.datasets[split].split
        return compute_metrics(
            pred.probs,
            data.targets[pred.indices],
            data.mask[pred.indices],
            threshold=float(self.trainer_cfg.threshold),
            rare=self.rare,
        )

    def _update_best(self, metrics: dict) -> list[str]:
        improved = []
        for name, key in BEST_MONITORS.items():
            value, best = metrics[key], self.state.best[name]
            if value is not None and (best.value is None or value > best.value):
                best.value, best.epoch = value, self.state.epoch
                improved.append(name)
        if CheckpointName.best_mean.value in improved:
            self.state.bad_epochs = 0
        else:
            self.state.bad_epochs += 1
        return improved

    def _save_epoch(self, metrics: dict, improved: list[str]) -> None:
        """Bests first, then `last`, then the periodic copy of `last`: a job killed in between
        resumes from the previous `last` and repeats the epoch (adopting a best saved meanwhile)."""
        weights_only = self._checkpoint(metrics, full=False)
        for name in improved:
            self.checkpoints.save(name, weights_only)
        last = self.checkpoints.save(CheckpointName.last.value, self._checkpoint(metrics, full=True))
        self.checkpoints.save_periodic(self.state.epoch, last)  # resumable, should `last` be lost

    def _log_epoch(
        self, tracker: Tracker, epoch: int, epochs: int, train: dict, val_loss: float, m: dict, seconds: float
    ) -> None:
        tracker.scalars("train", {f"loss_{k}": v for k, v in train.items()}, epoch)
        tracker.scalar("val/loss", val_loss, epoch)
        tracker.scalar("train/data_wait_share", self.data_wait_share, epoch)
        tracker.scalars(
            "val",
            {
                k: m[k]
                for k in ("auroc_mean", "auroc_micro", "auroc_rare", "auroc_min", "auprc_mean", "f1_macro", "f1_micro")
            },
            epoch,
        )
        tracker.scalars("val/auroc", {tag_name(k): v for k, v in m["auroc"].items()}, epoch)
        for name, lr in self.epoch_lrs.items():  # the rate of the epoch's last step, not the next epoch's first
            tracker.scalar(f"lr/{name}", lr, epoch)
        best = self.state.best[CheckpointName.best_mean.value]
        remaining = (epochs - epoch) * self.state.elapsed_s / max(epoch, 1)
        val = self._val_label()
        log.info(
            "%s epoch %d/%d | train loss %.4f (%s) | %s loss %.4f | %s mean AUROC %s (best %s @ %s) | %.1fs "
            "(waiting for data %.0f%%), %s ETA %.0fs%s",
            self.name,
            epoch,
            epochs,
            train["combined"],
            ", ".join(f"{k} {v:.4f}" for k, v in train.items() if k != "combined"),
            val,
            val_loss,
            val,
            _fmt(m["auroc_mean"]),
            _fmt(best.value),
            best.epoch,
            seconds,
            100 * self.data_wait_share,
            self.name,
            remaining,
            self._compile_note(),
        )

    def _val_label(self) -> str:
        """`val`, or `val (first N of M batches)` under trainer.limit_val_batches: the epoch line's
        metrics (and best checkpoints) then come from part of the split, the final summary's from all of it."""
        limit, total = self.trainer_cfg.limit_val_batches, len(self.loaders["val"])
        if limit is None or int(limit) >= total:
            return "val"
        return f"val (first {int(limit)} of {total} batches)"

    # ------------------------------------------------------------------ end of phase
    def _finish(self) -> dict[str, Any]:
        stopped_by = self._stopped_by()
        result: dict[str, Any] = {
            "stage": self.name,
            "modalities": list(self.extras["modalities"]),
            "epochs_run": self.state.epoch,  # finished epochs only (a cut one is in `unfinished_epoch`)
            "stopped_early": stopped_by in ("pruned", "early_stopping"),
            "stopped_by": stopped_by,
            # trainer.max_time: this stage's budget when it stopped (a rerun with more time continues it) and
            # the epoch it cut short, whose steps were discarded
            "time_budget_s": self.time_budget_s if stopped_by == "max_time" else None,
            "unfinished_epoch": self.unfinished,
            "step_offset": self.step_offset,  # the phase's epochs as steps of the job (pruning.py)
            "best": {k: asdict(v) for k, v in self.state.best.items()},
            "rare_labels": [CHEXPERT_LABELS[j] for j in self.rare],
            "effective_batch_size": self.effective_batch_size,
            "train_samples": len(self.datasets["train"]),
            "wall_time_s": self.state.elapsed_s + (self.unfinished["seconds"] if self.unfinished else 0.0),
            "started_from_sha256": self.extras.get("started_from_sha256"),  # the checkpoint this phase started from
            # the pretrained encoders' contents it was trained from (models/sources.py)
            DIGEST_KEY: self.extras.get(DIGEST_KEY) or None,
        }
        if self.state.epoch == 0:  # the time budget ran out before the first epoch
            result.update(selected_checkpoint=None, checkpoint_path=None, best_epoch=None, val=None, test=None)
            self._write_result(result)
            return result
        select = CheckpointName(self.trainer_cfg.checkpoint.select).value
        if self.state.best[select].epoch is None:
            select = CheckpointName.last.value  # no defined metric ever (tiny debug splits)
        selected = self._load_selected(select)
        result.update(
            selected_checkpoint=select,
            checkpoint_path=str(selected),
            best_epoch=self.state.best[select].epoch if select in self.state.best else self.state.epoch,
        )
        for split in ("val", "test"):
            result[split] = self._evaluate(split, selected)
        self._write_result(result)
        return result

    def _load_selected(self, select: str) -> Path:
        """Load the selected checkpoint's weights into the model (every rank); its path."""
        selected = self.checkpoints.path(select)
        unrepaired = self._repair_best(select) if self.runtime.is_main and select in self.state.best else ""
        barrier()  # rank 0 has written the checkpoint every rank now loads
        try:
            load_weights(self.model, load_checkpoint(selected), selected, to_plain(self.cfg.model))
        except (DamagedFileError, FileNotFoundError) as err:  # FileNotFoundError: deleted
            raise DamagedFileError(
                f"{err}. It is {self.name}'s selected checkpoint ({select}){unrepaired}; set "
                f"trainer.resume=false to train the stage again"
            ) from err
        return selected

    def _evaluate(
        self, split: str, selected: Path, so: str = "the stage has no result (trainer.resume=false trains it again)"
    ) -> Optional[dict[str, Any]]:
        """The loaded checkpoint's metrics on `split` (its predictions saved); None for a split not
        evaluated. `so`: what a diverged checkpoint's predictions leave, for the error."""
        if split not in self.loaders or (split == "test" and not self.trainer_cfg.eval_test):
            return None
        pred = self.predict(split)
        self._refuse_non_finite_predictions(pred, split, of=f"of the selected checkpoint {selected}", so=so)
        if self.runtime.is_main:
            self._save_predictions(split, pred, selected)
        return {"loss": pred.loss, **self._metrics(split, pred)}

    def _add_test(self, recorded: dict[str, Any]) -> dict[str, Any]:
        """A complete stage's result with its test split evaluated from its selected checkpoint, as
        its finish would have with trainer.eval_test=true; the rest of the result stays as recorded."""
        selected = self._load_selected(str(recorded["selected_checkpoint"]))
        result = {**recorded, "test": self._evaluate("test", selected, so="its test split has no result")}
        self._write_result(result)
        return result

    def _repair_best(self, select: str) -> str:
        """A selected best checkpoint deleted or damaged after the stage finished (the rerun that
        finishes the stage again, pipeline.completed_phase) is written again from the full state of
        its epoch where one is kept (`epoch_NNN`, `last`). Returns why it could not be ("" if it was
        or needed not be)."""
        path, epoch = self.checkpoints.path(select), self.state.best[select].epoch
        if epoch is None or is_readable(path):  # (None: a test split evaluated later knows no epochs)
            return ""
        source = self.checkpoints.rebuild_best(select, epoch, CheckpointName.last.value)
        if source is None:
            return f", and no full state of its epoch {epoch} is left to write it again from"
        log.warning("%s: %s written again from %s (the same epoch's weights)", self.name, path.name, source.name)
        return ""

    def _write_result(self, result: dict[str, Any]) -> None:
        if self.runtime.is_main:
            # strict JSON: an undefined metric is null; a NaN here would be a bug
            write_text(self.directory / "metrics.json", json.dumps(result, indent=2, allow_nan=False))
        barrier()

    def _save_predictions(self, split: str, pred: Prediction, checkpoint: Path) -> None:
        """Probabilities with labels for later evaluation; patient ids replaced by group numbers."""
        save_predictions(
            self.directory / "predictions" / f"{split}.npz",
            pred.probs,
            self.datasets[split].split,
            pred.indices,
            checkpoint,
        )


def _first_epoch_only(checkpoints: list[Path]) -> bool:
    """Whether every readable checkpoint is from epoch 1 or earlier (a job killed while saving its
    first epoch): starting over then loses nothing that was finished."""
    for path in checkpoints:
        try:
            if int(load_checkpoint(path, mmap=True).get("epoch") or 0) > 1:
                return False
        except DamagedFileError:
            continue
    return True


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    fused = optimizer.defaults.get("fused")
    return f"{type(optimizer).__name__}{' (fused)' if fused else ''}"


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _scalars(metrics: dict) -> dict:
    """The summary numbers of a metrics dict (plain floats / None) for the checkpoint."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
