"""OmegaConf resolvers the config tree uses (registered by the entry point before composition).

- `${agreed_now:%H-%M-%S}`: `${now:}` that every rank of a torchrun job resolves alike (cached, so
  Hydra copies it into each sweep job's config and a requeued SLURM job keeps its directory).
- `${short_hash:${hydra.job.override_dirname}}`: a stable 8-character id of a job's overrides, so
  trial directories of a resumed study never collide with earlier trials.
- `${objective_directions:single|multi}`: Optuna's direction(s) for `hparams.objective`.
- `${remaining_trials:<sweep dir>,<study>,<total>}`: trials still to run for a study of `<total>`
  trials, so re-running a sweep command resumes the study instead of adding another full budget.
- `${resumed_seed:<seed>,<sweep dir>,<study>}`: the sampler seed plus the finished trials.
- `${optuna_storage:<sweep dir>}`: the study's SQLite URL in the sweep directory, which it creates
  (the sweeper opens the database before Hydra creates the directory for the first job).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Union

from omegaconf import OmegaConf

from mdfnet_hydra.distributed import agreed_now

OPTUNA_DB = "optuna.db"


def short_hash(text: str) -> str:
    return hashlib.sha1(str(text).encode()).hexdigest()[:8]


def objective_directions(objective: str) -> Union[str, list[str]]:
    if objective == "single":
        return "maximize"
    if objective == "multi":
        return ["maximize", "maximize"]
    raise ValueError(f"hparams.objective must be 'single' (val mean AUROC) or 'multi' (mean and minimum AUROC), got {objective!r}")


def finished_trials(sweep_dir: str, study_name: str) -> int:
    """Trials of the study in `<sweep dir>/optuna.db` that finished (completed, failed or pruned)."""
    db = Path(str(sweep_dir)) / OPTUNA_DB
    if not db.is_file():
        return 0
    import optuna

    try:
        study = optuna.load_study(study_name=str(study_name), storage=f"sqlite:///{db}")
    except KeyError:  # the database holds other studies only
        return 0
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())


def remaining_trials(sweep_dir: str, study_name: str, total: int) -> int:
    """`total` minus the trials this study already finished."""
    return max(0, int(total) - finished_trials(sweep_dir, study_name))


def resumed_seed(seed: int, sweep_dir: str, study_name: str) -> int:
    """The sampler's seed moved on by the finished trials, so a resumed study does not re-draw
    the random start-up trials it already ran."""
    return int(seed) + finished_trials(sweep_dir, study_name)


def optuna_storage(sweep_dir: str) -> str:
    directory = Path(str(sweep_dir)).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / OPTUNA_DB}"


def register_resolvers() -> None:
    OmegaConf.register_resolver("agreed_now", agreed_now, replace=True, use_cache=True)
    OmegaConf.register_resolver("short_hash", short_hash, replace=True)
    OmegaConf.register_resolver("objective_directions", objective_directions, replace=True)
    OmegaConf.register_resolver("remaining_trials", remaining_trials, replace=True)
    OmegaConf.register_resolver("resumed_seed", resumed_seed, replace=True)
    OmegaConf.register_resolver("optuna_storage", optuna_storage, replace=True)
