"""Entry point: `python -m mdfnet_hydra.prepare mimic.cxr_jpg=... mimic.reports=... mimic.ed=...
mimic.hosp=... output_dir=...` (config: conf/prepare.yaml). See mimic/build.py."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mdfnet_hydra.config import EXECUTION_WHITELIST, register_configs
from mdfnet_hydra.resolvers import register_resolvers

register_configs()
register_resolvers()


@hydra.main(config_path="pkg://mdfnet_hydra.conf", config_name="prepare", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig) -> None:
    """Input the preparation cannot use ends it with one line naming the file (cli.py)."""
    import logging

    from mdfnet_hydra.cli import reported

    with reported("mdfnet_hydra.prepare"):
        from mdfnet_hydra.mimic.build import prepare

        logging.getLogger("mdfnet_hydra").setLevel(logging.INFO)
        prepare(cfg)


if __name__ == "__main__":
    main()
