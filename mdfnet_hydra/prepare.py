"""Entry point: `python -m mdfnet_hydra.prepare mimic.cxr_jpg=... mimic.reports=... mimic.ed=...
mimic.hosp=... output_dir=...` (config: conf/prepare.yaml). See mimic/build.py."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mdfnet_hydra.config import EXECUTION_WHITELIST, register_configs
from mdfnet_hydra.resolvers import register_resolvers, required


def prepare_output_dir(_root_: Any) -> str:
    """`hydra.run.dir`: output_dir, refused with one line before Hydra creates it or writes its .hydra/
    record there when it cannot take the dataset (a file, under a file, not writable, a MIMIC folder)."""
    from mdfnet_hydra.cli import stop_at_start
    from mdfnet_hydra.mimic.build import output_dir_problem

    output_dir = required("output_dir", _root_)
    problem = output_dir_problem(_root_)
    if problem:
        stop_at_start(problem)
    return output_dir


register_configs()
register_resolvers()
OmegaConf.register_resolver("prepare_output_dir", prepare_output_dir, replace=True)


@hydra.main(config_path="pkg://mdfnet_hydra.conf", config_name="prepare", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig) -> None:
    """Input the preparation cannot use ends it with one line naming the file (cli.py); SIGTERM
    (scancel, kill) ends it as Ctrl-C does, its resizing workers with it."""
    import logging

    from mdfnet_hydra.cli import reported
    from mdfnet_hydra.signals import sigterm_unwinds

    with reported("mdfnet_hydra.prepare"), sigterm_unwinds():
        from mdfnet_hydra.mimic.build import prepare

        logging.getLogger("mdfnet_hydra").setLevel(logging.INFO)
        prepare(cfg)


if __name__ == "__main__":
    main()
