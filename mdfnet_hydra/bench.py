"""Entry point: `python -m mdfnet_hydra.bench` (config: conf/bench.yaml, the training config plus
`bench.*`). Prints a table and writes bench.json; see mdfnet_hydra/benchmarks/speed.py."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mdfnet_hydra.config import EXECUTION_WHITELIST, register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="bench", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig) -> None:
    import logging
    from pathlib import Path

    from mdfnet_hydra.benchmarks.speed import format_table, run_benchmark, write

    logging.getLogger("mdfnet_hydra").setLevel(logging.INFO)
    results = run_benchmark(cfg)
    path = write(results, Path(str(cfg.bench.output)))
    print(format_table(results))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
