"""What the evaluation is asked to read and where it writes: the stage directories under
`experiments_dir` and the problems that end `python -m mdfnet_hydra.evaluate` in one line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

from mdfnet_hydra.config import ConfigError, StageName


class EvaluationInputError(ConfigError):
    """An `experiments_dir` / `output_dir` with nothing to evaluate, or that the evaluation would
    write over: the user's input, one line (cli.py)."""


def input_problem(experiments_dir: str | Path, output_dir: str | Path) -> Optional[str]:
    """Why `experiments_dir` cannot be evaluated into `output_dir`, or None. Checked before any run
    is read: a missing directory or a typo would otherwise give an empty report and exit 0."""
    if not str(experiments_dir).strip():
        return "experiments_dir is empty: give a run, a sweep, or a folder of both"
    where = Path(experiments_dir).expanduser().resolve()
    if not where.exists():
        return f"experiments_dir {where} does not exist"
    if not where.is_dir():
        return f"experiments_dir {where} is not a directory: give a run, a sweep, or a folder of both"
    problem = output_dir_problem(where, output_dir)
    if problem is None and not stage_directories(where, exclude=Path(output_dir).expanduser().resolve()):
        problem = nothing_to_evaluate(where)
    return problem


def output_dir_problem(experiments_dir: str | Path, output_dir: str | Path) -> Optional[str]:
    """Why `output_dir` cannot hold the evaluation of `experiments_dir`, or None. An output directory
    that is the experiments directory or holds it would leave out every run (the evaluation skips
    its own output) and, the command's Hydra directory, write over a run's `.hydra/` record. One
    inside it is fine (skipped, as `<run>/evaluation/` is)."""
    where = Path(experiments_dir).expanduser().resolve()
    out = Path(output_dir).expanduser().resolve()
    if out != where and out not in where.parents:
        return None
    what = "is experiments_dir itself" if out == where else f"holds experiments_dir {where}"
    return (
        f"output_dir {out} {what}: every run would be skipped as part of the output, and Hydra's .hydra/ "
        "record there written over; choose another output_dir, outside it or a folder of its own inside it"
    )


STAGE_NAMES = {stage.value for stage in StageName}


def stage_directories(experiments_dir: Path, exclude: Optional[Path] = None) -> list[Path]:
    """Directories holding a stage's outputs: a metrics.json beside a config.yaml or checkpoints/,
    or, without a metrics.json, checkpoints/ or a stage directory's config.yaml (what a killed job
    leaves). Hidden directories (Hydra's `.hydra/`, the run record) and `exclude` are not searched;
    symbolic links to directories are followed (a folder of links to the runs of several sweeps),
    each real directory once."""
    found = []
    for directory in _directories(experiments_dir, exclude):
        if any((directory / name).exists() for name in ("metrics.json", "config.yaml", "checkpoints")):
            if _holds_a_stage(directory):
                found.append(directory)
    return sorted(found)


def _directories(root: Path, exclude: Optional[Path]) -> Iterator[Path]:
    """Every directory under `root` but hidden ones and `exclude`, links followed, none twice."""
    seen: set[str] = set()
    for current, children, _ in os.walk(root, followlinks=True):
        directory = Path(current)
        real = os.path.realpath(current)
        if real in seen or (exclude is not None and (directory == exclude or exclude in directory.parents)):
            children[:] = []
            continue
        seen.add(real)
        children[:] = sorted(c for c in children if not c.startswith("."))
        yield directory


def _holds_a_stage(directory: Path) -> bool:
    checkpoints = (directory / "checkpoints").is_dir()
    if (directory / "metrics.json").is_file():
        return checkpoints or (directory / "config.yaml").is_file()  # not a job's own summary
    return checkpoints or (directory.name in STAGE_NAMES and (directory / "config.yaml").is_file())


def nothing_to_evaluate(experiments_dir: Path) -> str:
    return (
        f"no finished runs under {experiments_dir}: nothing to evaluate (a finished run is a stage directory, "
        "stage1/ or stage2/, holding metrics.json, config.yaml and checkpoints/)"
    )
