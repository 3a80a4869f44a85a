"""The Hydra sweeper of the `hparams` presets: Optuna's, for a study that several processes share.

The presets keep `hydra/sweeper: optuna` (its settings and samplers) and set
`hydra.sweeper._target_` to `SharedStudySweeper`, which runs `mdfnet_hydra.sweep_study`'s loop:
distinct per-trial seeded draws, the Optuna trial number as the Hydra job number (the trial
directory), a study-wide trial budget and orphaned trials taken over. Hydra instantiates sweepers
only from its registered plugin classes: the entry point calls `register_sweeper()`.

This module imports nothing heavy (Optuna loads when a sweep starts).
"""

from __future__ import annotations

from typing import Any, Optional

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig

SAMPLER_WHITELIST = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")


class SharedStudySweeper(OptunaSweeper):
    """OptunaSweeper with the same settings, whose loop is safe for concurrent processes on one study."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Optional[Any],
        study_name: Optional[str],
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        custom_search_space: Optional[str],
        params: Optional[DictConfig],
    ) -> None:
        from hydra.utils import instantiate

        from mdfnet_hydra.sweep_study import SharedStudySweeperImpl

        seed = sampler.get("seed") if isinstance(sampler, DictConfig) else None
        self.sweeper = SharedStudySweeperImpl(
            instantiate(sampler, _execution_whitelist_=SAMPLER_WHITELIST),
            direction,
            storage,
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
            custom_search_space,
            params,
            seed=seed,
        )


def register_sweeper() -> None:
    """Make `SharedStudySweeper` a Hydra plugin (Hydra scans only the `hydra_plugins` package)."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(SharedStudySweeper)
