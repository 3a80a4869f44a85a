"""Evaluation of finished runs: metrics with uncertainty, paired comparisons, tables and figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from mdfnet_hydra.evaluation.inputs import EvaluationInputError
from mdfnet_hydra.tracking import public_message

log = logging.getLogger(__name__)


def evaluate_quietly(experiments_dir: Path, output_dir: Path, options) -> Optional[Path]:
    """The evaluation report at the end of a run or multirun (its directory, or None if it found
    nothing or failed): a failure here is logged and never fails the training job."""
    try:
        from mdfnet_hydra.evaluation.report import evaluate  # matplotlib and friends only when it runs

        if evaluate(experiments_dir, output_dir, options)["runs"]:
            return output_dir
    except EvaluationInputError as err:  # nothing finished to evaluate: said, not a failure
        log.warning("no evaluation written: %s", public_message(err))
    except Exception as err:  # noqa: BLE001 - into the run's log file: nothing naming patients
        log.warning(
            "evaluation of %s failed (%s: %s); run python -m mdfnet_hydra.evaluate experiments_dir=%s to retry",
            experiments_dir,
            type(err).__name__,
            public_message(err),
            experiments_dir,
        )
    return None
