"""Entry point: `python -m mdfnet_hydra.train [group=option ...] [key=value ...]`.

Imports stay light here; torch and the encoders load only once the job runs.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mdfnet_hydra.config import register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from mdfnet_hydra.pipeline import run

    return run(cfg)


if __name__ == "__main__":
    main()
