"""What makes two training configs train the same thing.

Two uses share one definition: a run directory accepts a later job only when its config has the
same identity (run_directory.py), and the evaluation groups runs as seed replicates when their
identities differ in the seed alone (evaluation/runs.py). Left out: where files go, logging, the
time budget, launch and DataLoader settings, evaluation options, sweep bookkeeping, the device;
and the batch keys, which count only through the effective batch they make (1 GPU x 16 and 2 GPUs
x 8 train alike). Everything else counts: seed, model, data, phases, loss, optimizer, precision,
`stage.init_from`, the feature-cache dtype...
"""

from __future__ import annotations

from typing import Any, Optional

OUTCOME_IRRELEVANT = (
    "paths",
    "evaluation",
    "hparams",
    "data.num_workers",
    "data.pin_memory",
    "data.feature_cache_on_device",  # where the cache is read from; the same batches (tests/test_feature_cache.py)
    "data.persistent_workers",
    "data.prefetch_factor",
    "data.worker_start",
    "data.token_cache",
    "data.verify_images",
    "trainer.device",
    "trainer.nproc_per_node",
    "trainer.nnodes",
    "trainer.node_rank",
    "trainer.rdzv_backend",
    "trainer.rdzv_endpoint",
    "trainer.rdzv_id",
    "trainer.max_restarts",
    "trainer.backend",
    "trainer.log_every_n_steps",
    "trainer.max_time",
    "trainer.resume",
    "trainer.eval_test",
    "trainer.compile",
    "trainer.compile_mode",
    "trainer.compile_loss",
    "trainer.grad_accum_foreach",  # the same sums, added in another way
    # how the text encoder runs (config.TEXT_RUNTIME_KEYS): masked padding, the attention kernel
    "model.text.length_buckets",
    "model.text.attention",
    "trainer.checkpoint.every_n_epochs",
    "trainer.checkpoint.keep_last",
    # counted through "(effective batch)"
    "trainer.batch_size",
    "trainer.global_batch_size",
    "trainer.grad_accum",
)
EFFECTIVE_BATCH = "(effective batch)"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (an empty dict stays one key)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def outcome_identity(config: dict[str, Any], effective_batch: Optional[int] = None) -> dict[str, Any]:
    """The resolved config as flat keys, without what cannot change what a run learns (nor the keys
    an earlier version wrote that today's schema has retired: config.retired_keys)."""
    from mdfnet_hydra.config import retired_keys

    every = flatten(config)
    retired = retired_keys(every)
    flat = {key: value for key, value in every.items() if not irrelevant(key) and key not in retired}
    if (config.get("data") or {}).get("synthetic") is not None:
        flat.pop("data.root", None)  # derived from data.synthetic and paths.data_dir
    flat[EFFECTIVE_BATCH] = effective_batch if effective_batch is not None else effective_batch_of(config)
    return flat


def irrelevant(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in OUTCOME_IRRELEVANT)


def effective_batch_of(config: dict[str, Any]) -> Optional[int]:
    """Samples per optimizer step as the config asks for them (per device x devices x accumulation)."""
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        return None
    try:
        world = int(trainer.get("nproc_per_node") or 1) * int(trainer.get("nnodes") or 1)
        accum = int(trainer.get("grad_accum") or 1)
        if trainer.get("global_batch_size") is not None:
            return int(trainer["global_batch_size"]) * accum
        return int(trainer.get("batch_size") or 0) * world * accum or None
    except (TypeError, ValueError):
        return None
