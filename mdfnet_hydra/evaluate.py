"""Entry point: `python -m mdfnet_hydra.evaluate experiments_dir=<a run, a sweep, or a folder of both>
output_dir=results/` (config: conf/evaluate.yaml, options in conf/evaluation/default.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mdfnet_hydra.config import EXECUTION_WHITELIST, register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="evaluate", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig) -> None:
    import logging

    from mdfnet_hydra.evaluation.report import evaluate

    logging.getLogger("mdfnet_hydra").setLevel(logging.INFO)
    evaluate(cfg.experiments_dir, cfg.output_dir, cfg.evaluation, cfg.data_root)


if __name__ == "__main__":
    main()
