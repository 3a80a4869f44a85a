"""The fixed cost of a job, in a fresh interpreter: what `python -m mdfnet_hydra.train` imports
before it trains, reading and checking its config, and opening its data as a job opens it
(job.open_job: manifest, splits, tokenizer, token ids, clinical normaliser).

    python -m mdfnet_hydra.benchmarks.startup <resolved training config.yaml>

Prints one JSON line: imports_s, config_s, dataset_open_s. `bench_startup` below
runs it and adds the interpreter's own start-up.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def main(config_path: str) -> dict[str, float]:
    started = time.perf_counter()
    import mdfnet_hydra.train  # noqa: F401 - the entry point's imports
    from mdfnet_hydra.pipeline import run  # noqa: F401 - and the training job's

    imported = time.perf_counter()
    from omegaconf import OmegaConf

    from mdfnet_hydra.config import load_train_config, validate_config
    from mdfnet_hydra.job import open_job

    cfg = load_train_config(OmegaConf.load(config_path))
    validate_config(cfg)
    configured = time.perf_counter()
    open_job(cfg)
    opened = time.perf_counter()
    return {"imports_s": imported - started, "config_s": configured - imported, "dataset_open_s": opened - configured}


def bench_startup(cfg: DictConfig, work: Path) -> dict[str, float]:
    """The fixed cost of a job in a fresh interpreter: imports, config, opening the dataset
    (manifest, splits, tokenizer, token ids, clinical normaliser) as a job opens it; interpreter start-up
    included in `total_s`."""
    import subprocess
    import sys

    path = work / "startup_config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.benchmarks.startup", str(path)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["total_s"] = time.perf_counter() - started
    log.info(
        "%-22s %9.1f s (imports %.1f s, config %.2f s, dataset open %.2f s)",
        "job start-up",
        result["total_s"],
        result["imports_s"],
        result["config_s"],
        result["dataset_open_s"],
    )
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
