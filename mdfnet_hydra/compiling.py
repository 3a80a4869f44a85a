"""torch.compile for the training step's forward (`trainer.compile`), with its shapes under control.

A compiled forward is only fast while it does not recompile: every new input shape costs a compile
(seconds to minutes), and past torch's recompile limit it silently falls back to eager. Report text
is the shape that varies, so with `model.text.length_buckets` the forward compiles static graphs,
one per bucket, and a shape beyond the buckets (more graphs than buckets) stops the job with an
error instead of running slowly without a word. Without buckets, torch marks the varying length
dynamic after its first change (one more compile) and keeps its own rules (at most 8 graphs, then
eager with a warning). The limit applies to the training step alone (`compiled_step`), not to the
rest of the process: validation runs the model eagerly, and transformers compiles its own helpers
(flex attention's masks).

`trainer.compile_mode`: torch's modes; `reduce_overhead` captures the compiled step with CUDA graphs
on a GPU, which removes the per-kernel launch cost that bounds small batches.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)

MODES = {
    "default": "default",
    "reduce_overhead": "reduce-overhead",
    "max_autotune": "max-autotune",
    "max_autotune_no_cudagraphs": "max-autotune-no-cudagraphs",
}


@dataclass(frozen=True)
class CompilePlan:
    """How a phase's forward is compiled: torch's mode, whether shapes are static (buckets set),
    and how many distinct graphs are allowed before the job fails."""

    mode: str
    static: bool
    graph_limit: int
    cuda_graphs: bool  # whether torch captures the compiled step with CUDA graphs (on a GPU)
    backend: str = "inductor"  # torch.compile's backend (tests use lighter ones)

    def records_graphs_on(self, device: Any) -> bool:
        """Whether the compiled step runs as CUDA graphs there (torch records none on a CPU)."""
        return self.cuda_graphs and getattr(device, "type", str(device)) == "cuda"

    @classmethod
    def of(cls, mode: Any, buckets: Sequence[int], backend: str = "inductor") -> "CompilePlan":
        from mdfnet_hydra.config import CompileMode

        name = str(getattr(mode, "value", mode))
        if name not in MODES:
            raise ValueError(f"trainer.compile_mode must be one of {sorted(MODES)}, got {name!r}")
        # static graphs, one per bucket; without buckets torch's own rules (graph_limit unused)
        return cls(MODES[name], bool(buckets), len(buckets), CompileMode(name).cuda_graphs, backend)


def compile_forward(forward: Callable, plan: CompilePlan) -> Callable:
    """`forward` through torch.compile as `plan` says.

    Torch keeps compiled graphs per code object, not per model: a second model of the same class
    (the next phase, the benchmark's next measurement) can count against the first one's graph
    limit. The in-memory compile state is therefore reset first; the on-disk caches that make a
    repeated compile fast are kept."""
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    kwargs: dict[str, Any] = {"dynamic": False} if plan.static else {}
    if plan.backend == "inductor":
        kwargs["mode"] = plan.mode
    return torch.compile(forward, backend=plan.backend, **kwargs)


def compile_counts() -> dict[str, int]:
    """Graphs compiled so far in this process and graph breaks (torch's own counters)."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


@contextmanager
def compiled_step(plan: CompilePlan, batch: dict) -> Iterator[None]:
    """Around one call of the compiled forward: with buckets, at most one graph per bucket, and a
    batch needing another stops the job saying what happened and what to change (torch alone would
    run it eagerly from then on). Without buckets, torch's own rules."""
    if not plan.static:
        yield
        return
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.exc import FailOnRecompileLimitHit

    try:
        with dynamo_config.patch(recompile_limit=max(plan.graph_limit, 1), fail_on_recompile_limit_hit=True):
            yield
    except FailOnRecompileLimitHit as err:
        shapes = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape") and v.dim() > 1}
        raise RuntimeError(
            f"trainer.compile: a batch shaped {shapes} needs one more compiled graph than the "
            f"{plan.graph_limit} allowed, one per model.text.length_buckets entry; torch would have run "
            "it uncompiled from here on. Give model.text.length_buckets a length that holds it, or run "
            "with trainer.compile=false"
        ) from err
