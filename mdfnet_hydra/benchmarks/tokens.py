"""How much of the text encoder's work is real tokens: the training split's report lengths, and the
share of real tokens among the tokens a batch computes on when reports are padded to
`model.text.max_length`, to each batch's longest report (the default), or to its length bucket
(`model.text.length_buckets`), for batches drawn as training draws them (shuffled, full batches).
A low share is what unpadding (variable-length attention) would win back; the number of distinct
shapes is what a compiled step compiles.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def padding_shares(lengths: np.ndarray, batch_size: int, max_length: int, buckets: Sequence[int], seed: int = 0):
    """Real-token shares and shape counts of shuffled full batches of reports of `lengths`."""
    from mdfnet_hydra.data.dataset import padded_length

    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths) // batch_size * batch_size
    if n == 0:
        raise ValueError(f"{len(lengths)} reports make no batch of {batch_size}")
    batches = lengths[np.random.default_rng(seed).permutation(len(lengths))[:n]].reshape(-1, batch_size)
    real = int(batches.sum())
    longest = batches.max(axis=1)
    bucketed = np.array([padded_length(int(x), buckets) for x in longest])
    return {
        "reports": int(len(lengths)),
        "batches": int(len(batches)),
        "tokens_mean": float(lengths.mean()),
        "tokens_p50": float(np.percentile(lengths, 50)),
        "tokens_p95": float(np.percentile(lengths, 95)),
        "tokens_max": int(lengths.max()),
        "max_length": int(max_length),
        "real_share_max_length": real / (n * int(max_length)),
        "real_share_batch_longest": real / float(batch_size * longest.sum()),
        "shapes_batch_longest": int(len(np.unique(longest))),
        "buckets": [int(b) for b in buckets],
        "real_share_buckets": real / float(batch_size * bucketed.sum()) if len(buckets) else None,
        "shapes_buckets": int(len(np.unique(bucketed))) if len(buckets) else None,
    }


def bench_text_tokens(cfg: DictConfig) -> dict[str, Any]:
    """The shares for the job's own training split (its data, tokenizer and max length, as a
    training job opens them), at the benchmark's batch size."""
    from mdfnet_hydra.config import Modality, load_train_config
    from mdfnet_hydra.job import open_job

    train = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in ("bench", "hydra")}
    run = load_train_config(train)
    run.modality.inputs = [Modality.text]
    job = open_job(run, splits=("train",))
    text = run.model.text
    result = padding_shares(
        job.datasets["train"].token_ids.lengths, int(cfg.bench.batch_size), int(text.max_length), text.length_buckets
    )
    buckets = (
        f", buckets {result['buckets']} {100 * result['real_share_buckets']:.0f}% ({result['shapes_buckets']} shapes)"
        if result["buckets"]
        else ""
    )
    log.info(
        "%-22s %d reports, tokens mean %.0f / p95 %.0f / max %d of %d; real tokens when padded to max_length "
        "%.0f%%, to the batch's longest %.0f%% (%d shapes)%s",
        "text_tokens",
        result["reports"],
        result["tokens_mean"],
        result["tokens_p95"],
        result["tokens_max"],
        result["max_length"],
        100 * result["real_share_max_length"],
        100 * result["real_share_batch_longest"],
        result["shapes_batch_longest"],
        buckets,
    )
    return result
