"""Shared fixtures: an offline environment, a small synthetic dataset, and config composition."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MDFNET_MACHINE", None)  # tests choose the machine they describe (test_machine_shapes)


import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from mdfnet_hydra.config import register_configs
from mdfnet_hydra.resolvers import register_resolvers


def share_cpus_between_test_processes(environ=os.environ) -> None:
    """Under pytest-xdist N test processes start jobs side by side, and each job would take torch
    threads for every CPU (a lone job's right choice): OpenMP threads that outnumber the cores
    spin-wait on each other, and the default suite took 12m13s against 8m13s with each job given
    its process's share (2026-11-27, 2 CPUs, 2 processes). Set before torch is imported (or
    given to it); a user's OMP_NUM_THREADS is kept; tests of the choice made without it remove it
    (`without_omp_num_threads`)."""
    processes = int(environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if processes > 1 and "OMP_NUM_THREADS" not in environ:
        environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // processes))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(environ["OMP_NUM_THREADS"]))


share_cpus_between_test_processes()

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SMALL_DATA = ["data.synthetic.num_samples=480", "data.synthetic.image_size=32"]

register_configs()
register_resolvers()


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """An entry point called in-process sets torch's threads for its machine (SLURM's allocation,
    LOCAL_WORLD_SIZE): the next test starts with the count pytest started with."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def output_root(tmp_path_factory) -> Path:
    """One output root per test session so the small synthetic dataset is generated once."""
    return tmp_path_factory.mktemp("outputs")


def make_cfg(overrides: list[str], run_dir: Path, output_root: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF)):
        small = [] if "data=processed" in overrides else SMALL_DATA
        cfg = compose(
            "train", overrides=[f"paths.root={output_root}", *small, *quiet_evaluation(overrides), *overrides]
        )
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    return cfg


@pytest.fixture
def cfg_factory(tmp_path, output_root):
    def factory(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        return make_cfg(list(overrides), run_dir or tmp_path / "run", output_root)

    return factory


def quiet_evaluation(overrides) -> list[str]:
    """The end-of-run evaluation (figures, bootstrap) is tested where it is the subject, and off
    elsewhere unless a test sets evaluation.* itself: it would double the suite's time."""
    return [] if any(o.startswith("evaluation.") for o in overrides) else ["evaluation.on_finish=false"]


def run_cli(
    *args: str, cwd: Path = REPO, env_extra: dict | None = None, timeout: int = 600, exact: bool = False
) -> subprocess.CompletedProcess:
    """The real entry point, in a subprocess, as a user runs it (`exact`: with nothing added)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    extra = [] if exact else quiet_evaluation(args)
    return subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.train", *args, *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def interrupted_cli(
    *args: str, when: Callable[[], bool], timeout: float = 300, sig: int = signal.SIGINT
) -> tuple[int, str]:
    """The real entry point as a terminal's foreground job (its own process group, SIGINT not
    ignored), sent what Ctrl-C sends (or `sig`: SIGTERM is what scancel and SLURM's time limit send
    every process of a job) once `when()` holds: (exit status, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mdfnet_hydra.train", *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + timeout
    while not when() and time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, sig)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.fixture
def without_omp_num_threads(monkeypatch):
    """The environment of a user who set no OMP_NUM_THREADS (the test processes' share removed)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def config_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)
