"""Entry point: `python -m mdfnet_hydra.bench` (config: conf/bench.yaml, the training config plus
`bench.*`). Prints a table and writes bench.json; see mdfnet_hydra/benchmarks/speed.py."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mdfnet_hydra.config import EXECUTION_WHITELIST, register_configs
from mdfnet_hydra.resolvers import register_resolvers

register_configs()
register_resolvers()


@hydra.main(config_path="pkg://mdfnet_hydra.conf", config_name="bench", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig) -> None:
    """A config the benchmark cannot run ends it with one line (cli.py)."""
    import logging
    from pathlib import Path

    from mdfnet_hydra.cli import reported

    with reported("mdfnet_hydra.bench"):
        from mdfnet_hydra.benchmarks.speed import format_table, run_benchmark, write

        logging.getLogger("mdfnet_hydra").setLevel(logging.INFO)
        results = run_benchmark(cfg)
        path = write(results, Path(str(cfg.bench.output)))
        print(format_table(results))
        print(f"results: {path}")


if __name__ == "__main__":
    main()
