"""How an entry point ends when the job cannot go on: errors a person reads, not tracebacks.

Every task function runs its body inside `reported(prog)`. In a single run (not a multirun trial,
whose failures trial.run_trial records in the trial's directory and the sweep goes on):

- An error that is the user's input, not a bug (`USER_ERRORS`: a config the project refuses, a run
  directory another job holds or that holds another config's results, a damaged input file, a full
  disk, a dataset or MIMIC source in the wrong format, weights not available offline, a `???`
  value not given) prints `<prog>: error: <message>` on stderr and exits with status 1. Any other
  exception is a bug and keeps its traceback. `HYDRA_FULL_ERROR=1` shows the traceback of every
  error, as it does for Hydra's own.
- A job that failed that way before doing any work leaves no directory behind: Hydra creates the
  run directory and writes `.hydra/` before the task function runs, so a directory holding nothing
  but that record (and the run-directory record and lock of run_directory.py) is removed, unless
  another job holds it or the error is a run-directory refusal (the directory is another job's).
- Ctrl-C prints one line (where the run stands and, for training, the command that resumes it) and
  exits with status 130; SIGTERM (scancel, a SLURM time limit or preemption) the same line with
  status 143.

Imports stay light: an error class is looked up only in modules already imported (an exception of
a class whose module was never imported cannot have been raised).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Optional

if TYPE_CHECKING:
    from omegaconf import DictConfig

# (module, class): the errors that are the user's input. Subclasses count (RunDirectoryConflict is a
# ConfigError, DamagedPredictionsError a DamagedFileError).
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("mdfnet_hydra.config", "ConfigError"),
    ("mdfnet_hydra.run_directory", "RunDirectoryBusy"),
    ("mdfnet_hydra.files", "DamagedFileError"),
    ("mdfnet_hydra.files", "DiskFullError"),
    ("mdfnet_hydra.data.manifest", "ManifestError"),
    ("mdfnet_hydra.data.dataset", "UnreadableImageError"),
    ("mdfnet_hydra.mimic.tables", "PrepareError"),
    ("mdfnet_hydra.models.hub", "ModelUnavailableError"),
    ("mdfnet_hydra.evaluation.runs", "NoRunEvaluatedError"),
    ("omegaconf.errors", "MissingMandatoryValue"),
)
# the directory belongs to another job (or its results): nothing of it is removed
REFUSALS: tuple[tuple[str, str], ...] = (
    ("mdfnet_hydra.run_directory", "RunDirectoryBusy"),
    ("mdfnet_hydra.run_directory", "RunDirectoryConflict"),
)
INTERRUPTED_STATUS = 128 + signal.SIGINT
TERMINATED_STATUS = 128 + signal.SIGTERM


_SAFE_OVERRIDE_VALUE = re.compile(r"^[\w./-]+$")


@contextmanager
def reported(prog: str, interrupted: Optional[Callable[[], str]] = None) -> Iterator[None]:
    """Run a task function's body; a user error or Ctrl-C ends the process with one line on stderr.
    `interrupted` says where the job stands and how to go on (computed only after a Ctrl-C)."""
    from mdfnet_hydra.trial import in_multirun

    try:
        yield
    except BaseException as err:  # noqa: BLE001 - sorted below; everything else is re-raised as it was
        if in_multirun():
            raise
        if is_terminated(err):
            print(f"{prog}: terminated (SIGTERM){_describe(interrupted)}", file=sys.stderr, flush=True)
            if not _full_error():
                raise SystemExit(TERMINATED_STATUS) from None
            raise
        if is_interrupt(err):
            print(f"{prog}: interrupted (Ctrl-C){_describe(interrupted)}", file=sys.stderr, flush=True)
            if not _full_error():
                raise SystemExit(INTERRUPTED_STATUS) from None
            raise
        if not is_user_error(err):
            raise
        if not _is_a(err, REFUSALS):
            remove_unused_output_dir()
        if _full_error():
            raise
        print(f"{prog}: error: {one_message(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


@contextmanager
def reported_sweep() -> Iterator[None]:
    """The sweep process's `reported`: a mistake found before or between trials (a search space
    that cannot be built, a study made with other settings or directions, a storage it cannot
    write, too many failed trials) ends the sweep with one line and status 1; Ctrl-C with one line
    and status 130 (rerunning the command resumes the study). Only where the process runs an entry
    point (`python -m mdfnet_hydra.train`); elsewhere, and under `HYDRA_FULL_ERROR=1`, it raises."""
    prog = _program()
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - sorted below; everything else is re-raised as it was
        if prog is None or _full_error():
            raise
        if is_interrupt(err):
            print(
                f"{prog}: sweep interrupted (Ctrl-C): finished trials are kept in the study; rerun the same "
                "command to go on (an unfinished trial is taken over and resumes)",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(INTERRUPTED_STATUS) from None
        if not _is_a(err, (*USER_ERRORS, ("mdfnet_hydra.trial", "SweepAborted"))):
            raise
        print(f"{prog}: error: {one_message(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def stop_at_start(message: str) -> NoReturn:
    """A mistake found while Hydra resolves the job's directory (a resolver of resolvers.py), before
    the task function runs and so outside `reported`, where Hydra would print its traceback: an
    entry point run as a program prints the one line and exits with status 1. Anywhere else (a test
    composing configs, `HYDRA_FULL_ERROR=1`) it is raised as the ConfigError it is. Hydra has
    created no directory yet, so none is left behind."""
    from mdfnet_hydra.config import ConfigError

    prog = _program()
    if prog is None or _full_error():
        raise ConfigError(message)
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _program() -> Optional[str]:
    """`mdfnet_hydra.<entry point>` when the process runs one as `python -m`, else None."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    return name if name.startswith("mdfnet_hydra.") else None


def is_user_error(err: BaseException) -> bool:
    return _is_a(err, USER_ERRORS)


def is_interrupt(err: BaseException) -> bool:
    """Ctrl-C: a KeyboardInterrupt, or the SIGINT that torch's elastic agent (the launcher of
    data-parallel workers) turns into its SignalException; also an error raised while one of those
    unwound: torch's checkpoint writer, interrupted mid-write, fails closing its file and raises
    `RuntimeError: ... unexpected pos` from the KeyboardInterrupt."""
    from mdfnet_hydra.files import error_chain

    return any(
        isinstance(e, KeyboardInterrupt)
        or (type(e).__name__ == "SignalException" and getattr(e, "sigval", None) == signal.SIGINT)
        for e in error_chain(err)
    )


def is_terminated(err: BaseException) -> bool:
    """SIGTERM: `Terminated` (sigterm_unwinds), or torch's elastic agent's SignalException for it
    (the launcher of data-parallel workers, which passes the signal on to them)."""
    from mdfnet_hydra.files import error_chain
    from mdfnet_hydra.signals import Terminated

    return any(
        isinstance(e, Terminated)
        or (type(e).__name__ == "SignalException" and getattr(e, "sigval", None) == signal.SIGTERM)
        for e in error_chain(err)
    )


def one_message(err: BaseException) -> str:
    """The error's message for the console: omegaconf's internal type lines dropped, its
    `full_key` kept in brackets, and a list of a single problem joined onto its heading."""
    if type(err).__name__ == "MissingMandatoryValue" and getattr(err, "full_key", None):
        return f"{err.full_key} is not set (it is ??? in the config): pass {err.full_key}=<value>"
    lines = [line for line in str(err).splitlines() if not re.match(r"\s*(reference_type|object_type)=", line)]
    joined: list[str] = []
    for line in lines:
        key = re.match(r"\s*full_key:\s*(.*)$", line)
        if key and joined:
            joined[-1] += f" (full_key: {key.group(1)})"
        else:
            joined.append(line)
    if len(joined) == 2 and joined[0].endswith(":") and joined[1].lstrip().startswith("- "):
        return f"{joined[0]} {joined[1].lstrip()[2:]}"
    return "\n".join(joined)


def _is_a(err: BaseException, names: tuple[tuple[str, str], ...]) -> bool:
    classes = tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules and hasattr(sys.modules[m], c))
    return isinstance(err, classes)


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _hydra_config() -> Any:
    """Hydra's config of the running job, or None outside one."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _describe(interrupted: Optional[Callable[[], str]]) -> str:
    if interrupted is None:
        return ""
    try:
        return f"; {interrupted()}"
    except Exception as err:  # noqa: BLE001 - the status line is a courtesy; never a second traceback
        return f" (where the job stands is unknown: {type(err).__name__})"


# ---------------------------------------------------------------- a job that never started
def remove_unused_output_dir() -> bool:
    """Remove the job's output directory when it holds nothing but the records written before the
    task function ran (Hydra's `.hydra/`, our `.mdfnet/` lock and config record), that record is
    this job's, and no other job holds the directory. Returns whether it was removed."""
    from mdfnet_hydra.distributed import process_rank

    hydra = _hydra_config()
    if hydra is None or not hydra.runtime.output_dir or process_rank() != 0:
        return False
    directory = Path(hydra.runtime.output_dir)
    if not _holds_only_records(directory) or not _records_are_this_jobs(directory, list(hydra.overrides.task)):
        return False
    if directory.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        return False
    with _unheld(directory) as free:
        if not free:
            return False
        for record in (".hydra", ".mdfnet"):
            shutil.rmtree(directory / record, ignore_errors=True)
    try:
        directory.rmdir()  # only if nothing appeared meanwhile
    except OSError:
        return False
    default_layout = not any(o.startswith("hydra.run.dir=") for o in hydra.overrides.hydra)
    if default_layout and re.fullmatch(r"\d{4}-\d\d-\d\d", directory.parent.name):
        _remove_if_empty(directory.parent)  # <root>/runs/<date>/ of conf/train.yaml (bench.yaml alike)
    return True


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


_RECORDS = {".hydra": {"config.yaml", "hydra.yaml", "overrides.yaml"}, ".mdfnet": {"lock", "config.yaml", "hydra"}}


def _holds_only_records(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    for entry in directory.iterdir():
        allowed = _RECORDS.get(entry.name)
        if allowed is None or not entry.is_dir() or any(p.name not in allowed for p in entry.iterdir()):
            return False
    return True


def _records_are_this_jobs(directory: Path, overrides: list[str]) -> bool:
    """Hydra's record is this job's, not that of another job that Hydra gave the same directory
    (two jobs started in the same second) and that has not claimed it yet."""
    from omegaconf import OmegaConf

    recorded = directory / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        return not (directory / ".hydra").exists()
    try:
        return [str(o) for o in OmegaConf.load(recorded)] == [str(o) for o in overrides]
    except Exception:  # noqa: BLE001 - unreadable: not provably ours
        return False


@contextmanager
def _unheld(directory: Path) -> Iterator[bool]:
    """Whether no job holds the directory's lock (run_directory.py), holding it meanwhile."""
    import fcntl

    lock = directory / ".mdfnet" / "lock"
    if not lock.is_file():
        yield True
        return
    with lock.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True


# ---------------------------------------------------------------- Ctrl-C in training
def training_status(run_dir: Path, phases: list[str], epochs: dict[str, int]) -> str:
    """Where an interrupted training job stands: the first unfinished stage and the epoch its last
    checkpoint holds."""
    for phase in phases:
        directory = run_dir / phase
        if (directory / "metrics.json").is_file():
            continue
        epoch = _checkpoint_epoch(directory / "checkpoints" / "last.pth")
        of = f" of {epochs[phase]}" if phase in epochs else ""
        if epoch is not None:
            return f"{phase} checkpointed after epoch {epoch}{of}"
        if (directory / "checkpoints").is_dir():
            return f"{phase} has checkpoints (epoch unknown)"
        return f"{phase} has no checkpoint yet (it starts again)"
    return "every stage finished (the rerun redoes the end of the job)"


def _checkpoint_epoch(path: Path) -> Optional[int]:
    """The epoch a `last` checkpoint holds; None when there is none or torch is not loaded yet (a
    Ctrl-C during start-up: no checkpoint can have been written)."""
    if not path.is_file() or "torch" not in sys.modules:
        return None
    from mdfnet_hydra.checkpoint import load_checkpoint

    try:
        epoch = load_checkpoint(path, mmap=True).get("epoch")
    except Exception:  # noqa: BLE001 - damaged: the rerun falls back to an older checkpoint itself
        return None
    return None if epoch is None else int(epoch)


def resume_command(prog: str, argv: list[str], run_dir: Path, launcher: Optional[str] = None) -> str:
    """The command line that continues this job: the same arguments with `hydra.run.dir` set to
    the job's directory (the default directory is named after the time a job starts). A worker
    that torchrun / srun started (`launcher`) cannot repeat its launcher's own arguments: it says so."""
    kept = [a for a in argv if not a.startswith("hydra.run.dir=")]
    where = os.path.relpath(run_dir) if run_dir.resolve().is_relative_to(Path.cwd().resolve()) else str(run_dir)
    if not _SAFE_OVERRIDE_VALUE.match(where):  # Hydra's override grammar: quote anything unusual
        where = '"' + where.replace("\\", "\\\\").replace('"', '\\"') + '"'
    start = [f"<the same {launcher} command>"] if launcher else ["python"]
    return " ".join([*start, shlex.join(["-m", prog, *kept, f"hydra.run.dir={where}"])])


def training_interrupted(cfg: "DictConfig", prog: str = "mdfnet_hydra.train") -> str:
    """The one line after Ctrl-C of a training job: its directory, where it stands, how to resume."""
    from mdfnet_hydra.distributed import worker_env

    run_dir = Path(str(cfg.paths.run_dir))
    phases = [getattr(s, "value", s) for s in cfg.stage.run]
    epochs = {p: int(cfg.phases[p].epochs) for p in phases if p in cfg.phases}
    worker = worker_env(nproc_per_node=int(cfg.trainer.nproc_per_node))
    command = resume_command(prog, sys.argv[1:], run_dir, launcher=worker.source if worker else None)
    return f"run directory {run_dir}: {training_status(run_dir, phases, epochs)}. Resume with: {command}"
