"""Entry point: `python -m mdfnet_hydra.train [group=option ...] [key=value ...]`.

Works the same as a plain command, as `trainer.nproc_per_node=N` (this job launches the workers),
and under `torchrun ... -m mdfnet_hydra.train` (every worker runs this, agreeing on one run
directory). Imports stay light here; torch and the encoders load only once the job runs.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mdfnet_hydra.config import EXECUTION_WHITELIST, register_configs
from mdfnet_hydra.distributed import process_rank
from mdfnet_hydra.resolvers import register_resolvers
from mdfnet_hydra.slurm_launcher import register_launcher
from mdfnet_hydra.sweeper import register_sweeper

register_configs()
register_resolvers()
register_sweeper()
register_launcher()


@hydra.main(config_path="pkg://mdfnet_hydra.conf", config_name="train", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig):
    """Returns the sweep objective (validation mean AUROC, or [mean, min] for hparams.objective=multi).
    A single run's user errors and Ctrl-C end it with one line (cli.py)."""
    from mdfnet_hydra.cli import reported, training_interrupted

    with reported("mdfnet_hydra.train", interrupted=lambda: training_interrupted(cfg)):
        from mdfnet_hydra.launch import run_job

        return run_job(cfg)


def _quiet_non_zero_ranks() -> None:
    """Under torchrun / srun only rank 0 writes Hydra's `.hydra/` record into the shared run directory."""
    if process_rank() != 0 and not any(a.startswith("hydra.output_subdir=") for a in sys.argv):
        sys.argv.append("hydra.output_subdir=null")


if __name__ == "__main__":
    _quiet_non_zero_ranks()
    main()
