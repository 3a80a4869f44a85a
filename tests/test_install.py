"""Every install runs, not only the editable one: a built wheel carries the configs (the top-level
conf/ ships as the package `mdfnet_hydra.conf`), and the installed entry points run from any
directory on the installed copy alone, with a user's `--config-dir` added to its configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, SMALL_DATA


def _version(distribution: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in metadata.version(distribution).split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()


# looked up, not imported: importing setuptools here would fight over distutils with what is loaded
if not _version("pip") or _version("setuptools") < (68,):
    pytest.skip("building the wheel offline needs pip and setuptools>=68 in this environment", allow_module_level=True)

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The checkout built into a wheel (offline, with this environment's setuptools) and installed
    without dependencies into a directory of its own."""
    root = tmp_path_factory.mktemp("install")
    # built from a copy: an in-tree build leaves build/ and *.egg-info in the checkout, and a stale
    # build/ there could put files into the wheel that the checkout no longer has
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("mdfnet_hydra", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist, site = root / "dist", root / "site"
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source), cwd=root)
    (wheel,) = dist.glob("mdfnet_hydra-*.whl")
    pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=root)
    return site


def pip(*args: str, cwd: Path) -> None:
    result = subprocess.run([*PIP, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pip {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def installed_env(site: Path) -> dict:
    """This environment's dependencies, but mdfnet_hydra only from `site`: PYTHONPATH holds nothing
    else (not the checkout), and the commands run outside the checkout."""
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}


def test_the_wheel_holds_every_module_and_config_of_the_checkout(site):
    def files(root: Path, pattern: str) -> set[str]:
        """Files under `root` (a package or conf/ directory, never a venv beside it), relative to its parent."""
        return {p.relative_to(root.parent).as_posix() for p in root.rglob(pattern) if "__pycache__" not in p.parts}

    expected = files(REPO / "mdfnet_hydra", "*.py") | {f"mdfnet_hydra/{f}" for f in files(REPO / "conf", "*.yaml")}
    expected.add("mdfnet_hydra/conf/__init__.py")
    assert files(site / "mdfnet_hydra", "*.py") | files(site / "mdfnet_hydra", "*.yaml") == expected
    top_level = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info") and p.name != "__pycache__"}
    assert top_level == {"mdfnet_hydra"}  # no stray top-level `conf` or `tests` package


def test_an_installed_wheel_trains_from_any_directory(site, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = installed_env(site)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, mdfnet_hydra, mdfnet_hydra.conf as c; print(json.dumps([mdfnet_hydra.__file__, c.__file__]))",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    package, conf = map(Path, json.loads(probe.stdout.strip().splitlines()[-1]))
    assert package == site / "mdfnet_hydra" / "__init__.py"
    assert conf == site / "mdfnet_hydra" / "conf" / "__init__.py"

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mdfnet_hydra.train",
            "debug=fast",
            "modality=clinical",
            "stage=stage1",
            f"paths.root={tmp_path / 'outputs'}",
            f"hydra.run.dir={run_dir}",
            *SMALL_DATA,
            "evaluation.on_finish=false",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Primary config directory not found" not in result.stderr
    assert (run_dir / "stage1" / "metrics.json").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())
    sources = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.config_sources)
    assert {"path": "mdfnet_hydra.conf", "schema": "pkg", "provider": "main"} in sources
    assert not [s for s in sources if str(REPO) in s["path"]]


def test_a_users_config_dir_adds_to_the_installed_configs(site, tmp_path):
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\nseed: 1234\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mdfnet_hydra.train",
            "--config-dir",
            str(tmp_path / "my_conf"),
            "experiment=mine",
            "modality=clinical",
            "--cfg",
            "job",
        ],
        cwd=tmp_path,
        env=installed_env(site),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seed: 1234" in result.stdout


def test_a_checkout_on_pythonpath_reads_its_own_conf(tmp_path):
    """Run from a checkout that is not installed (`.ci/gpu-check` does so), the entry points read
    that checkout's conf/, not the configs of whatever install the environment also has."""
    copy = tmp_path / "checkout"
    for name in ("mdfnet_hydra", "conf"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    train_yaml = copy / "conf" / "train.yaml"
    train_yaml.write_text(train_yaml.read_text() + "\nseed: 4242\n")  # the checkout's own value
    result = subprocess.run(
        [sys.executable, "-m", "mdfnet_hydra.train", "modality=clinical", "--cfg", "job"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seed: 4242" in result.stdout.splitlines()
