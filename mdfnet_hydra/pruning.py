"""Optuna pruning inside a sweep's trials (`hparams.pruner`), which Hydra's Optuna sweeper has no
way to do: the trial object lives in the sweep process, the training in the job.

A job of a multirun whose preset sets a pruner finds its own trial in the study's storage (the
sweeper runs trial N as Hydra job number N: sweep_study.py) and, on rank 0, reports its validation
mean AUROC after every epoch; stage 2's epochs follow stage 1's configured epochs on one step axis,
so trials are compared at equal training. When the pruner says the trial cannot catch up, every rank
stops at that epoch (the decision is broadcast), the stage finishes as an early-stopped one (its
best checkpoint, predictions and metrics written) and later stages are skipped. Rank 0 records the
decision on the trial as the pruner takes it, and once the job's files are written, records the
trial as PRUNED in the study itself (any launcher, SLURM included), so the sweeper leaves it as it
is, a resumed sweep does not run it again, and it never counts as a failure. A job killed in
between stops again at the same step when run again (requeued, or taken over by a resumed sweep). A requeued
job reports into the same trial: it reports the epoch it resumed from again (a job stopped between
saving an epoch and reporting it), and a step already reported keeps its value and its decision.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)


# system attribute of a trial its pruner stopped: the step it stopped at (the trial stays RUNNING
# until its job has written its results, then the job records it PRUNED)
PRUNED_AT_ATTR = "mdfnet:pruned_at_step"


@dataclass(frozen=True)
class PruningTarget:
    """Where a trial reports: picklable, so data-parallel workers get it with their config."""

    storage: str
    study_name: str
    trial_number: int
    pruner: dict[str, Any]  # hparams.pruner as plain values
    last_step: int  # the trial's last epoch on the step axis: reported, never a reason to stop


def make_pruner(settings: dict[str, Any]):
    import optuna

    name = str(getattr(settings["name"], "value", settings["name"]))
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(settings["n_startup_trials"]),
            n_warmup_steps=int(settings["n_warmup_steps"]),
            interval_steps=int(settings["interval_steps"]),
        )
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=int(settings["min_resource"]), reduction_factor=int(settings["reduction_factor"])
        )
    if name == "hyperband":
        maximum = settings.get("max_resource")
        return optuna.pruners.HyperbandPruner(
            min_resource=int(settings["min_resource"]),
            max_resource="auto" if maximum is None else int(maximum),
            reduction_factor=int(settings["reduction_factor"]),
        )
    return optuna.pruners.NopPruner()


def pruner_settings(cfg: Any) -> dict[str, Any]:
    """`hparams.pruner` as plain values, Hyperband's unset `max_resource` made the trial's last step:
    the configured epochs of the stages it runs (Optuna's "auto" would take the first finished
    trial's last step, too early when that trial stopped early)."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(cfg.hparams.pruner, resolve=True, enum_to_str=True)
    if settings.get("max_resource") is None:
        settings["max_resource"] = trial_steps(cfg)
    return settings


def trial_steps(cfg: Any) -> int:
    """A whole trial on the step axis: the configured epochs of the stages it runs."""
    return sum(int(cfg.phases[getattr(s, "value", s)].epochs) for s in cfg.stage.run)


def pruning_target(cfg: Any) -> Optional[PruningTarget]:
    """This Hydra job's trial, when it is a job of an Optuna sweep with a pruner; else None."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hparams = cfg.get("hparams")
    if hparams is None or str(getattr(hparams.pruner.name, "value", hparams.pruner.name)) == "none":
        return None
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    storage = OmegaConf.select(hydra, "sweeper.storage", default=None)
    if storage is None or OmegaConf.select(hydra, "job.num", default=None) is None:
        # an in-memory study lives in the sweep process alone: a job cannot report to it
        log.warning(
            "hparams.pruner.name=%s but the study has no storage a job can reach "
            "(hydra.sweeper.storage): this trial runs unpruned",
            getattr(hparams.pruner.name, "value", hparams.pruner.name),
        )
        return None
    return PruningTarget(
        storage=str(storage),
        study_name=str(hparams.study_name),
        trial_number=int(hydra.job.num),
        pruner=pruner_settings(cfg),
        last_step=trial_steps(cfg),
    )


class TrialReporter:
    """The trial of a PruningTarget, opened in the job's process (rank 0)."""

    def __init__(self, target: PruningTarget) -> None:
        import optuna

        from mdfnet_hydra.study_storage import open_storage

        self.target = target
        self.study = optuna.load_study(
            study_name=target.study_name, storage=open_storage(target.storage), pruner=make_pruner(target.pruner)
        )
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, target.trial_number
        )
        self.trial = optuna.trial.Trial(self.study, trial_id)

    def report(self, value: Optional[float], step: int) -> bool:
        """Report the epoch's value at `step` (an undefined value is not reported); whether to stop.

        Each step is decided once. A stop is recorded on the trial at once (PRUNED_AT_ATTR), so a
        job killed before it finishes stops again, without reporting, at the same step when run
        again (a SLURM requeue, a resumed sweep taking over the trial, still RUNNING until its job
        has written its files; from its checkpoint, or from the start should they be lost). A trial the
        study already finished takes no reports: pruned, it stops; otherwise it goes on. A step the
        trial already holds was decided when it was first reported and not stopped there: it keeps
        its first value and goes on (a requeued job reports the epoch it resumed from again, in
        case it stopped before reporting it)."""
        from optuna.trial import TrialState

        stored = self.study._storage.get_trial(self.trial._trial_id)
        if stored.state != TrialState.RUNNING:
            return stored.state == TrialState.PRUNED
        pruned_at = stored.system_attrs.get(PRUNED_AT_ATTR)
        if pruned_at is not None:  # decided: no more reports, and it stops where the pruner stopped it
            return int(step) >= int(pruned_at)
        held = stored.intermediate_values.get(int(step))
        if held is not None:
            if value is not None and not math.isclose(float(value), held, rel_tol=1e-6, abs_tol=1e-9):
                log.warning(
                    "trial %d already holds %.6f at step %d: the repeated epoch's %.6f is not reported "
                    "(a step keeps its first value)",
                    self.target.trial_number,
                    held,
                    step,
                    float(value),
                )
            return False
        if value is not None and math.isfinite(float(value)):
            self.trial.report(float(value), int(step))
        if step >= self.target.last_step or not self.trial.should_prune():
            return False  # at its last epoch it completes: stopping there would save nothing
        self.study._storage.set_trial_system_attr(self.trial._trial_id, PRUNED_AT_ATTR, int(step))
        return True

    def mark_pruned(self) -> None:
        """Record the trial PRUNED once its job has written its files (until then a resumed sweep
        takes it over as an unfinished trial, and its job stops at the recorded step)."""
        from optuna.trial import TrialState

        self.study.tell(self.target.trial_number, state=TrialState.PRUNED, skip_if_finished=True)
        log.info("trial %d recorded as pruned in study %s", self.target.trial_number, self.target.study_name)
