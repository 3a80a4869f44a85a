"""The fixed cost of a job, in a fresh interpreter: what `python -m mdfnet_hydra.train` imports
before it trains, reading and checking its config, and opening its data as a job opens it
(job.open_job: manifest, splits, tokenizer, token ids, clinical normaliser).

    python -m mdfnet_hydra.benchmarks.startup <resolved training config.yaml>

Prints one JSON line: imports_s, config_s, dataset_open_s. The benchmark (speed.bench_startup)
runs it and adds the interpreter's own start-up.
"""

from __future__ import annotations

import json
import sys
import time


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


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
