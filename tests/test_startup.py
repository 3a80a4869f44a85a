"""A job imports only what its modalities use: no image stack for a text or clinical run, no text
stack for a vision or clinical run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = """
import json, sys
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from mdfnet_hydra.config import register_configs
from mdfnet_hydra.resolvers import register_resolvers
register_configs(); register_resolvers()
from mdfnet_hydra.pipeline import run
with initialize_config_dir(config_dir=sys.argv[1], version_base=None):
    cfg = compose("train", overrides=sys.argv[3:])
with open_dict(cfg):
    cfg.paths.run_dir = sys.argv[2]
run(cfg)
print(json.dumps(sorted(sys.modules)))
"""

IMAGE_STACK = {"open_clip", "timm", "mdfnet_hydra.models.vision"}


@pytest.mark.parametrize(
    "modality, absent",
    [
        ("clinical", IMAGE_STACK | {"mdfnet_hydra.models.text"}),
        ("text", IMAGE_STACK),
        ("vision", {"mdfnet_hydra.models.text"}),
    ],
)
def test_a_job_imports_only_what_its_modalities_use(tmp_path, modality, absent):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            str(REPO / "conf"),
            str(tmp_path / "run"),
            f"modality={modality}",
            "stage=stage1",
            "debug=fast",
            f"paths.root={tmp_path}",
            "data.synthetic.num_samples=200",
            "data.synthetic.image_size=32",
            "evaluation.on_finish=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "mdfnet_hydra.trainer" in loaded
    assert not (absent & loaded), sorted(absent & loaded)
