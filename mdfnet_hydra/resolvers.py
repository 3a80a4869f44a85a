"""OmegaConf resolvers the config tree uses (registered by the entry point before composition).

- `${agreed_now:%H-%M-%S}`: `${now:}` that every rank of a torchrun job resolves alike (cached, so
  Hydra copies it into each sweep job's config and a requeued SLURM job keeps its directory).
- `${short_hash:${hydra.job.override_dirname}}`: a stable 8-character id of a job's overrides, the
  second half of a trial directory's name (the first is the Optuna trial number, see sweep_study.py).
- `${objective_directions:single|multi}`: Optuna's direction(s) for `hparams.objective`.
- `${optuna_storage:<sweep dir>}`: the study's SQLite URL in the sweep directory, which it creates
  (the sweeper opens the database before Hydra creates the directory for the first job).

The study's budget (trials already in the study, from any process) and the sampler's per-trial
seeds are the sweeper's business (mdfnet_hydra/sweep_study.py), decided under the study's lock
when each trial is asked for, not once at composition time.
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


def optuna_storage(sweep_dir: str) -> str:
    directory = Path(str(sweep_dir)).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / OPTUNA_DB}"


def register_resolvers() -> None:
    OmegaConf.register_resolver("agreed_now", agreed_now, replace=True, use_cache=True)
    OmegaConf.register_resolver("short_hash", short_hash, replace=True)
    OmegaConf.register_resolver("objective_directions", objective_directions, replace=True)
    OmegaConf.register_resolver("optuna_storage", optuna_storage, replace=True)
