"""One Optuna study shared by several sweep processes (the sweeper behind `mdfnet_hydra.sweeper`).

Users parallelise a search by starting the same `--multirun hparams=...` command several times
(terminals, cluster jobs). Every process works on the one study in the storage, and:

- Draws are distinct and reproducible: before a trial's parameters are sampled, the sampler's
  random states are re-seeded from (sampler seed, Optuna trial number). Trial numbers are unique in
  the storage, so two processes never draw from the same random stream, and trial N draws the same
  start-up parameters whichever process runs it, first run or resumed.
- Trial directories never collide: a trial runs as Hydra job number = its Optuna trial number
  (`initial_job_idx`), and the presets' `hydra.sweep.subdir` starts with `${hydra.job.num}`.
- The study holds at most `n_trials` trials: deciding how many trials to ask for and asking for
  them happen under an exclusive lock file next to the study (`optuna.db.lock`), counting every
  trial the study has (running ones included), so concurrent processes never overshoot the budget.
  The lock also serialises opening the storage (creating a SQLite schema is not concurrency-safe).
- A trial whose sweep process died (Ctrl-C, kill, lost node) is taken over, not replaced: each
  process marks the trials it runs with its host, pid and a heartbeat (a system attribute written
  every `HEARTBEAT_S` seconds). A RUNNING trial whose owner is gone (same host: the pid no longer
  runs; another host: no heartbeat for `STALE_AFTER_S` seconds) is run again by the next process
  that looks, with its own parameters and number, so it lands in its old directory and the job
  resumes from its checkpoints. The study counts it once.
- SQLite waits up to `study_storage.SQLITE_TIMEOUT_S` for another process's write instead of failing with
  "database is locked".
- A study holds only comparable trials: the process that creates it stores a fingerprint (the job
  config's outcome identity without the swept parameters, the search space and the objective) in
  its user attributes; a process whose fingerprint differs (a `debug=fast` study resumed by the
  real sweep) stops before any trial, naming the differing keys. A study from before fingerprints
  adopts this command's.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import socket
import threading
import time
import zlib
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.trial import FrozenTrial, Trial, TrialState

from mdfnet_hydra.config import ConfigError, hparams_problems, refuse, validate_config
from mdfnet_hydra.files import write_text
from mdfnet_hydra.identity import irrelevant, outcome_identity
from mdfnet_hydra.pruning import PRUNED_AT_ATTR
from mdfnet_hydra.slurm_launcher import JobLost
from mdfnet_hydra.study_storage import open_storage, sqlite_path
from mdfnet_hydra.trial import abort_if_too_many_failures, record_lost_job

log = logging.getLogger(__name__)

OWNER_ATTR = "mdfnet:owner"  # {"host", "pid", "start"} of the sweep process running the trial
HEARTBEAT_ATTR = "mdfnet:heartbeat"  # time.time() of that process's latest sign of life
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0  # no heartbeat for this long: the owner (on another host) is gone
LOCK_SUFFIX = ".lock"
SWEEP_LOCK = ".study.lock"  # in the sweep directory, for storages that are not a SQLite file
FINGERPRINT_ATTR = "mdfnet:fingerprint"  # user attribute: what makes the study's trials comparable


# ----------------------------------------------------------------------------- per-trial seeds
def trial_seed_sequence(seed: int, number: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(number)])


def reseed_for_trial(sampler: optuna.samplers.BaseSampler, seed: int, number: int) -> None:
    """Re-seed every random state the sampler holds (nested samplers included, e.g. TPE's start-up
    RandomSampler) from (seed, trial number), each attribute from its own child stream."""
    _reseed(sampler, trial_seed_sequence(seed, number), set())


def _reseed(obj: Any, sequence: np.random.SeedSequence, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in sorted(getattr(obj, "__dict__", {}).items()):
        child = np.random.SeedSequence(sequence.entropy, spawn_key=(*sequence.spawn_key, zlib.crc32(name.encode())))
        if isinstance(value, LazyRandomState):
            value.rng.seed(int(child.generate_state(1)[0]))
        elif isinstance(value, np.random.RandomState):
            value.seed(int(child.generate_state(1)[0]))
        elif isinstance(value, np.random.Generator):
            setattr(obj, name, np.random.default_rng(child))
        elif isinstance(value, optuna.samplers.BaseSampler):
            _reseed(value, child, seen)


# ----------------------------------------------------------------------------- owners
def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields 3... of /proc/<pid>/stat (state, ..., start time at [19]), where /proc exists."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (tells a reused pid apart), if known."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None


def pid_space() -> str:
    """Which pid numbers a pid means here: the boot and the pid namespace (containers that share a
    hostname, e.g. with host networking, do not share pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def this_owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()), "pids": pid_space()}


def process_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    stat = _proc_stat(int(pid))
    if stat is None:
        return True
    return stat[0] not in ("Z", "X") and (start is None or int(stat[19]) == int(start))


def is_orphan(trial: FrozenTrial, now: Optional[float] = None, host: Optional[str] = None) -> bool:
    """A RUNNING trial that no live sweep process runs any more."""
    if trial.state != TrialState.RUNNING:
        return False
    owner = trial.system_attrs.get(OWNER_ATTR)
    if not isinstance(owner, dict):
        return True  # started by a sweeper that did not record owners: nobody will finish it
    if owner.get("host") == (host or socket.gethostname()) and owner.get("pids", "") == pid_space():
        return not process_alive(owner["pid"], owner.get("start"))
    beat = trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)
    return (now if now is not None else time.time()) - float(beat) > STALE_AFTER_S


class Heartbeat:
    """Marks the trials this process runs as alive, every HEARTBEAT_S seconds, in a daemon thread."""

    def __init__(self, storage: optuna.storages.BaseStorage, interval: float = HEARTBEAT_S) -> None:
        self._storage = storage
        self._interval = interval
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mdfnet-study-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def add(self, trial_id: int) -> None:
        with self._lock:
            self._ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = sorted(self._ids)
            for trial_id in ids:
                try:
                    self._storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
                except Exception as err:  # noqa: BLE001 - finished meanwhile, or the storage is busy: next beat
                    log.debug("heartbeat of trial id %s: %s", trial_id, err)


def trial_directory_busy(sweep_dir: Path, number: int) -> bool:
    """Whether a job still holds the trial's run directory (run_directory.py's lock)."""
    for lock in sweep_dir.glob(f"{number}_*/.mdfnet/lock"):
        with lock.open("a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                continue  # a file system without locks: cannot tell
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


# ----------------------------------------------------------------------------- storage and lock
def lock_path(storage: Any, sweep_dir: str) -> Path:
    """Next to a SQLite study file (every process of the study opens that file); otherwise in the
    sweep directory."""
    db = sqlite_path(storage) if isinstance(storage, str) else None
    return Path(str(db) + LOCK_SUFFIX) if db is not None else Path(str(sweep_dir)) / SWEEP_LOCK


@contextmanager
def study_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of one study (released by the kernel if one dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def consecutive_runs(items: Sequence[tuple[Trial, Sequence[str]]]) -> list[list[tuple[Trial, Sequence[str]]]]:
    """Trials split where their numbers stop being consecutive: each run is one launch whose job
    numbers are the trial numbers."""
    runs: list[list[tuple[Trial, Sequence[str]]]] = []
    for item in sorted(items, key=lambda it: it[0].number):
        if runs and runs[-1][-1][0].number + 1 == item[0].number:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


# ----------------------------------------------------------------------------- fingerprint
def _resolved_tree(node: DictConfig, prefix: str = "") -> dict[str, Any]:
    """The node as plain values, without outcome-irrelevant keys (paths, ...) and without values
    that resolve only inside a job (`${hydra:runtime.output_dir}` in the sweeper process)."""
    out: dict[str, Any] = {}
    for key in node.keys():
        path = f"{prefix}{key}"
        if path == "hydra" or irrelevant(path):
            continue
        try:
            value = node[key]
            if isinstance(value, DictConfig):
                out[key] = _resolved_tree(value, path + ".")
            elif isinstance(value, ListConfig):
                out[key] = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
            else:
                out[key] = value.value if isinstance(value, Enum) else value
        except Exception:  # noqa: BLE001 - missing (???) or not resolvable here: not part of the fingerprint
            continue
    return out


def study_fingerprint(
    config: DictConfig, distributions: dict[str, BaseDistribution], directions: Sequence[Any]
) -> dict:
    """What makes the trials of one study comparable: the config every trial shares (its outcome
    identity, identity.py, less the swept parameters), the search space and the objective."""
    swept = tuple(distributions)
    identity = {
        key: value
        for key, value in outcome_identity(_resolved_tree(config)).items()
        if not any(key == name or key.startswith(name + ".") for name in swept)
    }
    hparams = config.get("hparams") if isinstance(config, DictConfig) else None
    objective = {
        "directions": [getattr(d, "name", str(d)).lower() for d in directions],
        "hparams.objective": None if hparams is None else str(hparams.get("objective")),
    }
    fingerprint = {
        "config": identity,
        "search_space": {k: distribution_to_json(d) for k, d in sorted(distributions.items())},
        "objective": objective,
    }
    return json.loads(json.dumps(fingerprint, default=str))  # as the storage returns it


def fingerprint_differences(stored: dict, current: dict) -> list[str]:
    """`key: stored -> current` for each key whose value differs (search space and objective keys prefixed)."""
    from mdfnet_hydra.config import retired_keys

    absent = "(absent)"
    changes = []
    for section, label in (("config", ""), ("search_space", "search space "), ("objective", "objective ")):
        old, new = stored.get(section) or {}, current.get(section) or {}
        if section == "config":  # a study made by an earlier version: keys retired since never counted
            old = {k: v for k, v in old.items() if k not in retired_keys(old)}
        for key in sorted(set(old) | set(new)):
            if old.get(key, absent) != new.get(key, absent):
                changes.append(f"{label}{key}: {old.get(key, absent)} -> {new.get(key, absent)}")
    return changes


def search_space(params: list[str]) -> tuple[dict, dict, list]:
    """The sweeper's parsed search space; a parameter Optuna cannot make a distribution of is named."""
    try:
        return create_params_from_overrides(params)
    except ValueError as err:
        for param in params:
            try:
                create_params_from_overrides([param])
            except ValueError as own:
                raise ConfigError(f"sweep parameter {param!r}: {own}") from err
        raise ConfigError(f"the search space {params} cannot be built: {err}") from err


def check_swept_keys(config: DictConfig, keys: Sequence[str]) -> None:
    """Refuse a searched key the config does not have, before a study records trials of it: a
    misspelt key would fail every trial and leave the study name bound to the typo's settings.
    Config groups (`model/vision`, `modality`) and appended keys (`+key`) are Hydra's to check."""
    groups = set(OmegaConf.select(config, "hydra.runtime.choices", default={}) or {})
    missing = object()
    unknown = [
        key
        for key in keys
        if not key.startswith(("+", "~")) and "/" not in key and key not in groups
        and OmegaConf.select(config, key, default=missing) is missing
    ]  # fmt: skip
    if unknown:
        raise ConfigError(
            f"sweep parameter(s) {', '.join(unknown)} name no key of the config (misspelt?): nothing was run, "
            "no study was changed"
        )


def check_directions(study: optuna.Study, directions: Sequence[Any]) -> None:
    """Refuse a study that optimises the other way: Optuna loads an existing study with its own
    directions whatever `create_study` was given, and its best trial would be this command's worst."""
    stored = [d.name.lower() for d in study.directions]
    wanted = [str(getattr(d, "name", d)).lower() for d in directions]
    if stored != wanted:
        raise ConfigError(
            f"Study {study.study_name} in this storage was created to {' and '.join(stored)}; this command "
            f"would {' and '.join(wanted)}: its best trial would be this command's worst. Pass "
            f"hparams.study_name=<new name> for a new study."
        )


def check_fingerprint(study: optuna.Study, fingerprint: dict) -> None:
    """Store the fingerprint in a new study (or adopt an older one without); refuse a study made
    with other settings, before any trial runs. Call under the study lock."""
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        if study._storage.get_all_trials(study._study_id, deepcopy=False):
            log.info(
                f"Study {study.study_name} has no settings fingerprint (made by an earlier version): "
                "adopting this command's settings as the study's"
            )
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        return
    changes = fingerprint_differences(stored, fingerprint)
    if changes:
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ConfigError(
            f"Study {study.study_name} was created with other settings, and its trials would not be comparable "
            f"with this command's ({shown}). Pass hparams.study_name=<new name> for a new study, or run with the "
            f"study's settings to resume it."
        )


# ----------------------------------------------------------------------------- the sweeper
class SharedStudySweeperImpl(OptunaSweeperImpl):
    """The Optuna sweeper's loop, for a study that other processes work on at the same time."""

    def __init__(self, *args: Any, seed: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = None if seed is None else int(seed)

    def sweep(self, arguments: list[str]) -> None:
        from mdfnet_hydra.cli import reported_sweep

        with reported_sweep():
            self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        # what every trial's job would refuse (the sweep's own settings, and the config its trials share):
        # before the study, not in trial 0; a trial's own values out of range fail that trial (launch.py)
        refuse(hparams_problems(self.config))
        if OmegaConf.select(self.config, "trainer", default=None) is not None:  # a training job's config
            validate_config(self.config, host=False)  # (the trials' machines check their own files)
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        distributions, fixed_params, fixed_overrides = search_space(params_conf)
        check_swept_keys(self.config, [*distributions, *fixed_params])
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in distributions.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, int(np.prod([len(v) for v in grid.values()], dtype=np.int64)))
            log.info(f"Updating num of trials to {self.n_trials} due to using GridSampler.")
        for name in fixed_params:
            distributions.pop(name, None)
        self._space = (distributions, fixed_params, fixed_overrides)
        directions = self._get_directions()

        self._lock_path = lock_path(self.storage, self.sweep_dir)
        try:
            with study_lock(self._lock_path):
                study = optuna.create_study(
                    study_name=self.study_name,
                    storage=open_storage(self.storage),
                    sampler=self.sampler,
                    directions=directions,
                    load_if_exists=True,
                )
                check_directions(study, directions)
                check_fingerprint(study, study_fingerprint(self.config, distributions, directions))
        except OSError as err:
            raise ConfigError(
                f"hydra.sweeper.storage={self.storage}: the study cannot be written there "
                f"({err.strerror or err}: {err.filename or self._lock_path})"
            ) from err
        seeding = f" (re-seeded per trial from seed {self.seed} and the trial number)" if self.seed is not None else ""
        log.info(f"Study name: {study.study_name}")
        log.info(f"Storage: {self.storage}")
        log.info(f"Sampler: {type(self.sampler).__name__}{seeding}")
        log.info(f"Directions: {directions}")
        log.info(f"Study budget: {self.n_trials} trials in all, shared with any other process on this study")

        owner = this_owner()
        with Heartbeat(study._storage) as heartbeat:
            while True:
                with study_lock(self._lock_path):
                    batch = self._claim_batch(study, owner, heartbeat)
                if not batch:
                    break
                for run in consecutive_runs(batch):
                    self._launch(study, run, directions, heartbeat)
        self._save_results(study, directions)

    # -- claiming trials (under the study lock) ------------------------------------------------
    def _claim_batch(self, study: optuna.Study, owner: dict, heartbeat: Heartbeat) -> list[tuple[Trial, Sequence[str]]]:
        """Up to n_jobs trials for this process: orphans first, else new trials within the budget."""
        trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
        batch: list[tuple[Trial, Sequence[str]]] = []
        for frozen in (t for t in trials if is_orphan(t)):
            if len(batch) == self.n_jobs:
                break
            if trial_directory_busy(Path(str(self.config.hydra.sweep.dir)), frozen.number):
                continue  # its sweep process is gone but its job still runs (a SLURM job): leave it be
            self._claim(study, frozen._trial_id, owner, heartbeat)
            trial = Trial(study, frozen._trial_id)
            try:
                overrides = self._configure(trial)
            except Exception as err:  # noqa: BLE001 - its parameters no longer fit this command's search space
                log.warning(
                    f"Trial {trial.number} was left running by a sweep that ended and does not fit this "
                    f"command's search space ({err}); recording it as failed"
                )
                heartbeat.discard(frozen._trial_id)
                study.tell(trial, state=TrialState.FAIL)
                continue
            log.info(f"Trial {trial.number} was left running by a sweep that ended; running it again")
            batch.append((trial, overrides))
        if batch:
            return batch
        used = sum(1 for t in trials if t.state != TrialState.WAITING)
        for _ in range(min(self.n_jobs, self.n_trials - used)):
            trial = study.ask()
            self._claim(study, trial._trial_id, owner, heartbeat)
            try:
                overrides = self._configure(trial)
            except BaseException:
                heartbeat.discard(trial._trial_id)
                study.tell(trial, state=TrialState.FAIL)
                raise
            batch.append((trial, overrides))
        return batch

    @staticmethod
    def _claim(study: optuna.Study, trial_id: int, owner: dict, heartbeat: Heartbeat) -> None:
        study._storage.set_trial_system_attr(trial_id, OWNER_ATTR, owner)
        study._storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        heartbeat.add(trial_id)

    def _configure(self, trial: Trial) -> Sequence[str]:
        if self.seed is not None:
            reseed_for_trial(self.sampler, self.seed, trial.number)
        distributions, fixed_params, fixed_overrides = self._space
        return self._configure_trials([trial], distributions, fixed_params, fixed_overrides)[0]

    # -- running and recording -----------------------------------------------------------------
    def _launch(
        self, study: optuna.Study, run: list[tuple[Trial, Sequence[str]]], directions: list[str], heartbeat: Heartbeat
    ) -> None:
        trials = [trial for trial, _ in run]
        returns = self.launcher.launch([list(o) for _, o in run], initial_job_idx=trials[0].number)
        failures, lost = [], []
        for trial, ret in zip(trials, returns):
            heartbeat.discard(trial._trial_id)
            stored = study._storage.get_trial(trial._trial_id)
            if stored.state.is_finished():
                continue  # a job the sweep's pruner stopped has recorded its trial as PRUNED (pruning.py)
            if PRUNED_AT_ATTR in stored.system_attrs:  # stopped by the pruner, its job failed after
                study.tell(trial=trial, state=TrialState.PRUNED, skip_if_finished=True)
                continue
            try:
                values = self._values(ret.return_value, len(directions))
                try:
                    study.tell(trial=trial, state=TrialState.COMPLETE, values=values, skip_if_finished=True)
                except RuntimeError as err:  # GridSampler stops the study once the grid is exhausted
                    if "`Study.stop` is supposed to be invoked" not in str(err):
                        raise
            except JobLost as err:  # killed: a failed trial, as if the job had recorded its own failure
                study.tell(trial=trial, state=TrialState.FAIL, values=None, skip_if_finished=True)
                log.warning(f"Failed experiment: trial {trial.number}: {err}")
                lost.append(str(err))
                # in its directory; a job killed before Hydra made one gets one named for the trial,
                # so that the failure budget (which counts failure.json files) counts it
                sweep_dir = Path(str(self.config.hydra.sweep.dir))
                for job_dir in list(sweep_dir.glob(f"{trial.number}_*")) or [sweep_dir / f"{trial.number}_lost"]:
                    record_lost_job(job_dir, str(err))
            except Exception as err:  # noqa: BLE001 - recorded as a failed trial, as the plugin does
                study.tell(trial=trial, state=TrialState.FAIL, values=None, skip_if_finished=True)
                log.warning(f"Failed experiment: {err}")
                failures.append(err)
        if lost:  # the sweep's failure budget (hparams.max_failure_rate), which the job did not reach
            abort_if_too_many_failures(self.config, Path(str(self.config.hydra.sweep.dir)), lost[-1])
        if len(failures) / len(returns) > self.max_failure_rate:
            log.error(f"Failed {failures} times out of {len(returns)} with max_failure_rate={self.max_failure_rate}.")
            for ret in returns:
                ret.return_value  # noqa: B018 - JobReturn raises the job's own exception, with its traceback

    @staticmethod
    def _values(value: Any, n_directions: int) -> list[float]:
        if n_directions == 1:
            try:
                return [float(value)]
            except (ValueError, TypeError) as err:
                raise ValueError(f"Return value must be float-castable. Got '{value}'.") from err
        try:
            values = [float(v) for v in value]
        except (ValueError, TypeError) as err:
            raise ValueError(f"Return value must be a list or tuple of float-castable values. Got '{value}'.") from err
        if len(values) != n_directions:
            raise ValueError(
                "The number of the values and the number of the objectives are"
                f" mismatched. Expect {n_directions}, but actually {len(values)}."
            )
        return values

    def _save_results(self, study: optuna.Study, directions: list[str]) -> None:
        """optimization_results.yaml from the whole study (every process's trials), written atomically."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.warning("No trial of the study has completed yet: no optimization_results.yaml")
            return
        if len(directions) < 2:
            best = study.best_trial
            results: dict[str, Any] = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info(f"Best parameters: {best.params}")
            log.info(f"Best value: {best.value}")
        else:
            front = study.best_trials
            results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in front]}
            log.info(f"Number of Pareto solutions: {len(front)}")
            for t in front:
                log.info(f"    Values: {t.values}, Params: {t.params}")
        write_text(
            Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml",
            OmegaConf.to_yaml(OmegaConf.create(results)),
        )
