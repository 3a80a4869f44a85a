"""What a job of a multirun does with its outcome: the sweep's policy, apart from how jobs launch.

- The objective Optuna receives: validation mean AUROC, or with `hparams.objective=multi` the pair
  (mean AUROC, minimum per-label AUROC); NaN when undefined.
- A failing trial (exception, NaN loss, out of memory, undefined objective) is recorded in its
  directory (`failure.json`: reason and a traceback without patients' data) and returns NaN, which
  Optuna records as a failed trial, so one bad trial never ends a sweep; past
  `hparams.max_failure_rate` x `hparams.n_trials` failed trials the next failure aborts the sweep.
  Plain multiruns (`experiment=...`) never abort; their failures show in the summary.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Optional, Union

from omegaconf import DictConfig

from mdfnet_hydra.files import write_text
from mdfnet_hydra.tracking import public_message, public_traceback

log = logging.getLogger(__name__)
FAILURE_FILE = "failure.json"
Objective = Union[float, list[float]]


class SweepAborted(RuntimeError):
    """More trials failed than hparams.max_failure_rate allows."""


def in_multirun() -> bool:
    """Whether this Hydra job is one of a multirun's. Only the Hydra process knows: it passes what
    follows from it (evaluate at the end or not) down to the pipeline and the workers it starts."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def objective_value(cfg: DictConfig, summary: dict) -> Objective:
    mean = _nan_if_none(summary.get("objective"))
    if cfg.get("hparams") is not None and cfg.hparams.objective == "multi":
        return [mean, _nan_if_none(summary.get("auroc_min"))]
    return mean


def run_trial(cfg: DictConfig, run_dir: Path, train: Callable[[], dict], is_writer: bool) -> Objective:
    """Train one trial; a failure becomes a failed trial with its reason in `run_dir` (written by
    `is_writer`, rank 0), not the end of the sweep."""
    failure = run_dir / FAILURE_FILE
    failure.unlink(missing_ok=True)  # a resumed or requeued trial starts with a clean record
    try:
        value = objective_value(cfg, train())
        if any(math.isnan(v) for v in _as_list(value)):
            _record_failure(
                failure,
                "objective undefined (no epoch finished, or no label with both classes in val)",
                None,
                is_writer,
            )
        return value
    except Exception as err:  # noqa: BLE001 - every failure becomes a failed trial with its reason
        reason = f"{type(err).__name__}: {_first_line(public_message(err))}"
        log.error("job failed: %s", reason)
        _record_failure(failure, reason, public_traceback(err), is_writer)
        abort_if_too_many_failures(cfg, run_dir.parent, reason)
        return objective_value(cfg, {})


def _first_line(text: str) -> str:
    """A message's first line, with the list of problems a heading ending in ':' introduces (a
    refused config names each of its problems on a line of its own)."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines:
        return ""
    items = [line[2:] for line in lines[1:] if line.startswith("- ")]
    return f"{lines[0]} {'; '.join(items)}" if lines[0].endswith(":") and items else lines[0]


def _record_failure(path: Path, reason: str, trace: Optional[str], is_writer: bool) -> None:
    if is_writer:
        write_text(path, json.dumps({"status": "failed", "reason": reason, "traceback": trace}, indent=2))


def record_lost_job(job_dir: Path, reason: str) -> None:
    """A trial whose job ended without a result (killed), recorded by the sweep as the job would have
    recorded its own failure."""
    job_dir.mkdir(parents=True, exist_ok=True)
    _record_failure(job_dir / FAILURE_FILE, reason, None, is_writer=True)


def abort_if_too_many_failures(cfg: DictConfig, sweep_dir: Path, reason: str) -> None:
    if cfg.get("hparams") is None:
        return  # plain multiruns (ablations) run every job and report failures in the summary
    failed = len(list(sweep_dir.glob(f"*/{FAILURE_FILE}")))
    allowed = cfg.hparams.max_failure_rate * cfg.hparams.n_trials
    if failed > allowed:
        raise SweepAborted(
            f"{failed} trials failed, more than hparams.max_failure_rate={cfg.hparams.max_failure_rate} x "
            f"{cfg.hparams.n_trials} trials allows; aborting the sweep. Last failure: {reason}"
        )


def _as_list(value: Objective) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _nan_if_none(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)
