"""Defaults live in one place, the schema (mdfnet_hydra/config.py): a file of conf/ says only what its
option changes, so the two cannot drift. A value equal to the schema's default is allowed only with
a `# restated: <why>` comment on its line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from conftest import CONF
from mdfnet_hydra.config import OPTIMIZER_SCHEMAS, BenchConfig, HparamsConfig, OptimizerName, TrainConfig

UNSET = object()


def schema_defaults(group: str, option: str) -> DictConfig:
    """The schema's defaults for a whole training config, with the option's own schema where its
    group has one per option (the optimizers) and the sweep and benchmark sections filled in."""
    schema = OmegaConf.structured(TrainConfig)
    name = option if group == "optimizer" else "adamw"
    schema.optimizer = OmegaConf.structured(OPTIMIZER_SCHEMAS[OptimizerName(name)])
    schema.hparams = OmegaConf.structured(HparamsConfig)
    OmegaConf.set_struct(schema, False)
    schema.bench = OmegaConf.structured(BenchConfig)
    return schema


def leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, DictConfig) and len(node):
        for key in node.keys():
            yield from leaves(node._get_node(key), f"{path}{key}.")
    else:
        yield path[:-1], node


def default_at(schema: DictConfig, path: str) -> Any:
    *parents, leaf = path.split(".")
    node: Any = schema
    for part in parents:
        if not isinstance(node, DictConfig) or part not in node or node._get_node(part)._is_none():
            return UNSET
        node = node._get_node(part)
    if not isinstance(node, DictConfig) or leaf not in node:
        return UNSET
    return "???" if OmegaConf.is_missing(node, leaf) else node._get_node(leaf)


def plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    elif hasattr(value, "_value"):
        value = value._value()
    if isinstance(value, list):
        return [plain(v) for v in value]
    return getattr(value, "value", value)


def restated_values(path: Path, group: str, root: Path = CONF) -> list[str]:
    """`file: key = value` for each value of the file equal to the schema's default, unless its
    line says why (`# restated:`)."""
    text = path.read_text()
    package = "" if "# @package _global_" in text else group.replace("/", ".") + "."
    node = OmegaConf.load(path)
    schema = schema_defaults(group, path.stem)
    found = []
    for key, value in leaves(node):
        if key.split(".")[0] in ("defaults", "hydra") or key == "":
            continue
        default = default_at(schema, package + key)
        if default is UNSET or plain(value) != plain(default):
            continue
        leaf = re.escape(key.split(".")[-1])
        if re.search(rf"(?m)^\s*{leaf}:.*#\s*restated:", text):
            continue
        found.append(f"{path.relative_to(root)}: {package}{key} = {plain(value)!r}")
    return found


def group_files() -> Iterator[tuple[Path, str]]:
    for path in sorted(CONF.rglob("*.yaml")):
        group = str(path.parent.relative_to(CONF))
        if group != "." and not group.startswith("hydra"):
            yield path, group


def test_the_checker_finds_a_restated_default(tmp_path):
    restating = tmp_path / "trainer" / "mine.yaml"
    restating.parent.mkdir()
    restating.write_text(
        "batch_size: 16\ngrad_accum: 4\ncheckpoint:\n  select: best_mean\n  keep_last: 3  # restated: on purpose\n"
    )
    assert restated_values(restating, "trainer", root=tmp_path) == [
        "trainer/mine.yaml: trainer.batch_size = 16",
        "trainer/mine.yaml: trainer.checkpoint.select = 'best_mean'",
    ]


def test_no_option_restates_a_schema_default():
    files = list(group_files())
    assert len(files) > 30
    restated = [line for path, group in files for line in restated_values(path, group)]
    assert restated == [], "values equal to the schema's default (say only what the option changes):\n" + "\n".join(
        restated
    )


def test_the_benchmark_config_restates_no_default():
    node = OmegaConf.load(CONF / "bench.yaml")
    schema = schema_defaults("bench", "bench")
    equal = [key for key, value in leaves(node.bench, "bench.") if plain(value) == plain(default_at(schema, key))]
    assert equal == []
