"""OmegaConf resolvers the config tree uses (registered by the entry point before composition).

- `${agreed_now:%H-%M-%S}`: `${now:}` that every rank of a torchrun job resolves alike (cached, so
  Hydra copies it into each sweep job's config and a requeued SLURM job keeps its directory).
- `${short_hash:${hydra.job.override_dirname}}`: a stable 8-character id of a job's overrides, the
  second half of a trial directory's name (the first is the Optuna trial number, see sweep_study.py).
- `${objective_directions:single|multi}`: Optuna's direction(s) for `hparams.objective`.
- `${job_dir:}`: the job's directory, `${hydra:runtime.output_dir}`, which Hydra sets only when the
  job runs; before that (`--cfg job --resolve`) the directory a run started now would get.
- `${optuna_storage:<sweep dir>}`: the study's SQLite URL in the sweep directory, which it creates
  (the sweeper opens the database before Hydra creates the directory for the first job).
- `${multirun_only:<preset>}`: the `hydra.run.dir` of the sweep presets (experiment=baselines,
  hparams=random, ...): run without --multirun, the job stops with one line saying to add it,
  before Hydra creates a directory (a multirun uses hydra.sweep.dir).
- `${required:<key>}`: the value of a mandatory (`???`) key that names the job's directory
  (prepare's `output_dir`); not given, the job stops with one line saying what to pass.
- `${evaluation_output_dir:}`: the evaluation's `output_dir`, its Hydra directory; one that is
  `experiments_dir` or holds it stops the job with one line before Hydra writes `.hydra/` there
  (it would write over a training run's record).

The last three run while Hydra resolves the job's directory, before the task function and so before
cli.reported can turn an error into one line: they stop the program themselves (cli.stop_at_start).

The study's budget (trials already in the study, from any process) and the sampler's per-trial
seeds are the sweeper's business (mdfnet_hydra/sweep_study.py), decided under the study's lock
when each trial is asked for, not once at composition time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Union

from omegaconf import OmegaConf

from mdfnet_hydra.cli import stop_at_start
from mdfnet_hydra.config import multirun_only_message
from mdfnet_hydra.distributed import agreed_now

OPTUNA_DB = "optuna.db"


def short_hash(text: str) -> str:
    return hashlib.sha1(str(text).encode()).hexdigest()[:8]


def objective_directions(objective: str) -> Union[str, list[str]]:
    """Resolved while Hydra builds the sweeper, before it runs: a mistake is one line (cli.py)."""
    if objective == "single":
        return "maximize"
    if objective == "multi":
        return ["maximize", "maximize"]
    stop_at_start(
        f"hparams.objective must be 'single' (val mean AUROC) or 'multi' (mean and minimum AUROC), got {objective!r}"
    )


def optuna_storage(sweep_dir: str) -> str:
    """The study's SQLite file in the sweep directory, made here (Hydra builds the sweeper before
    the sweep directory exists); a directory that cannot be made is one line (cli.py)."""
    directory = Path(str(sweep_dir)).expanduser().resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        stop_at_start(
            f"the sweep directory {directory} cannot be made ({err.strerror or err}): choose another paths.root"
        )
    return f"sqlite:///{directory / OPTUNA_DB}"


def job_dir() -> str:
    """`${hydra:runtime.output_dir}`, or before the job runs (Hydra sets it then) the directory a
    run would use: `hydra.run.dir`, or a placeholder under the sweep directory of a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    output_dir = OmegaConf.select(hydra, "runtime.output_dir", default=None)  # ??? before the job runs
    if output_dir:
        return str(output_dir)
    if hydra.mode == RunMode.MULTIRUN:
        return os.path.join(os.path.abspath(str(hydra.sweep.dir)), "<each job's hydra.sweep.subdir>")
    return os.path.abspath(str(hydra.run.dir))


def multirun_only(preset: str) -> str:
    """A sweep preset run as one job would silently train one default config: stop, saying to add
    --multirun. It never returns (OmegaConf checks a resolver's annotation: NoReturn warns)."""
    stop_at_start(multirun_only_message(preset))


def required(key: str, _root_: Any) -> str:
    """The value of `key`, which must be given (it names the job's directory)."""
    if OmegaConf.is_missing(_root_, key):
        stop_at_start(f"{key} is not set (it is ??? in the config): pass {key}=<value>")
    return str(OmegaConf.select(_root_, key))


def evaluation_output_dir(_root_: Any) -> str:
    """`output_dir` of `python -m mdfnet_hydra.evaluate`, refused where it is or holds
    `experiments_dir` (not given or empty: the task function says so)."""
    from mdfnet_hydra.evaluation.inputs import output_dir_problem

    output_dir = str(OmegaConf.select(_root_, "output_dir"))
    if not OmegaConf.is_missing(_root_, "experiments_dir"):
        experiments_dir = OmegaConf.select(_root_, "experiments_dir")
        problem = output_dir_problem(experiments_dir, output_dir) if str(experiments_dir or "").strip() else None
        if problem:
            stop_at_start(problem)
    return output_dir


def register_resolvers() -> None:
    OmegaConf.register_resolver("agreed_now", agreed_now, replace=True, use_cache=True)
    OmegaConf.register_resolver("short_hash", short_hash, replace=True)
    OmegaConf.register_resolver("objective_directions", objective_directions, replace=True)
    OmegaConf.register_resolver("optuna_storage", optuna_storage, replace=True)
    OmegaConf.register_resolver("multirun_only", multirun_only, replace=True)
    OmegaConf.register_resolver("required", required, replace=True)
    OmegaConf.register_resolver("evaluation_output_dir", evaluation_output_dir, replace=True)
    OmegaConf.register_resolver("job_dir", job_dir, replace=True)  # not cached: one per multirun job
