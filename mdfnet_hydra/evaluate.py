"""Entry point: `python -m mdfnet_hydra.evaluate experiments_dir=<a run, a sweep, or a folder of both>
output_dir=results/` (config: conf/evaluate.yaml, options in conf/evaluation/default.yaml).

Runs with damaged files are left out (warning, and listed in results.md); if every run found is,
the command fails with one line listing them (exit status 1), as it does for an `experiments_dir`
that is missing, empty, not a directory or holds no finished run, and other errors of its input
(cli.py), leaving no output directory behind. An `output_dir` that is `experiments_dir` or holds it
is refused while Hydra resolves its directory (resolvers.evaluation_output_dir), before Hydra
writes its `.hydra/` record there: a training run's own record is never written over."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mdfnet_hydra.config import EXECUTION_WHITELIST, register_configs
from mdfnet_hydra.resolvers import register_resolvers

register_configs()
register_resolvers()


@hydra.main(config_path="pkg://mdfnet_hydra.conf", config_name="evaluate", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig) -> None:
    import logging

    from mdfnet_hydra.cli import reported

    with reported("mdfnet_hydra.evaluate"):
        from mdfnet_hydra.config import evaluation_problems, refuse
        from mdfnet_hydra.evaluation.inputs import EvaluationInputError, input_problem

        refuse(evaluation_problems(cfg.evaluation))
        from mdfnet_hydra.evaluation.runs import evaluation_runtime

        evaluation_runtime(str(cfg.evaluation.device))  # a device the machine lacks: now, not at a recompute
        problem = input_problem(cfg.experiments_dir, cfg.output_dir)
        if problem:
            raise EvaluationInputError(problem)
        from mdfnet_hydra.evaluation.report import evaluate

        logging.getLogger("mdfnet_hydra").setLevel(logging.INFO)
        evaluate(cfg.experiments_dir, cfg.output_dir, cfg.evaluation, cfg.data_root)


if __name__ == "__main__":
    main()
