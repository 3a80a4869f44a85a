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
on a GPU, which removes the per-kernel launch cost that bounds small batches. A graph torch cannot
capture would otherwise run uncaptured after a log warning; within the training step it stops the
job with torch's reason, and each epoch line counts the graphs not captured.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

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

    text: bool = True  # whether the step's input has report text (the one shape that varies)

    @classmethod
    def of(cls, mode: Any, buckets: Sequence[int], backend: str = "inductor", text: bool = True) -> "CompilePlan":
        from mdfnet_hydra.config import CompileMode

        name = str(getattr(mode, "value", mode))
        if name not in MODES:
            raise ValueError(f"trainer.compile_mode must be one of {sorted(MODES)}, got {name!r}")
        cuda_graphs = CompileMode(name).cuda_graphs
        if not text:  # images and clinical features have one shape: one graph, whatever the buckets
            return cls(MODES[name], True, 1, cuda_graphs, backend, text=False)
        # static graphs, one per bucket; without buckets torch's own rules (graph_limit unused)
        return cls(MODES[name], bool(buckets), len(buckets), cuda_graphs, backend)

    def describe_shapes(self) -> str:
        """What the plan allows, for the log."""
        if not self.text:
            return "static shapes, at most 1 graph: no text input, one batch shape"
        if self.static:
            return f"static shapes, at most {self.graph_limit} graphs: one per text length bucket"
        return "text length dynamic after its first change; model.text.length_buckets fixes the shapes"


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
    """Graphs compiled so far in this process, graph breaks, and compiled graphs torch did not
    capture as CUDA graphs (torch's own counters; on a CPU every graph of a CUDA-graph mode counts)."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


CUDAGRAPH_SKIP = re.compile(r"(skipping|disabling) cudagraphs[^\n]*")


@contextmanager
def compiled_step(plan: CompilePlan, batch: dict) -> Iterator[None]:
    """Around one compiled training step (forward and backward, where torch compiles and captures):
    - with buckets, at most one graph per bucket: a batch needing another stops the job saying what
      happened and what to change (torch alone would run it eagerly from then on); without buckets,
      torch's own rules;
    - in a CUDA-graph mode, a graph torch cannot capture on the GPU (an input it mutates, a CPU
      tensor, an op graphs cannot hold) stops the job with torch's reason, where torch alone would
      log a warning and run that graph uncaptured, launch by launch."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    from torch._dynamo.exc import FailOnRecompileLimitHit

    settings: list[tuple[Any, dict[str, Any]]] = []
    if plan.cuda_graphs:
        settings.append((inductor_config.triton, {"cudagraph_or_error": True}))
    if plan.static:
        settings.append(
            (dynamo_config, {"recompile_limit": max(plan.graph_limit, 1), "fail_on_recompile_limit_hit": True})
        )
    with _assigned(settings):
        try:
            yield
        except FailOnRecompileLimitHit as err:
            shapes = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape") and v.dim() > 1}
            if not plan.text:
                raise RuntimeError(
                    f"trainer.compile: a batch shaped {shapes} needs a second compiled graph, where a run "
                    "without text has one batch shape; torch would have run it uncompiled from here on. "
                    "Run with trainer.compile=false"
                ) from err
            raise RuntimeError(
                f"trainer.compile: a batch shaped {shapes} needs one more compiled graph than the "
                f"{plan.graph_limit} allowed, one per model.text.length_buckets entry; torch would have run "
                "it uncompiled from here on. Give model.text.length_buckets a length that holds it, or run "
                "with trainer.compile=false"
            ) from err
        except Exception as err:
            reason = _cudagraph_skip(err) if plan.cuda_graphs else None
            if reason is None:
                raise
            raise RuntimeError(
                f"trainer.compile_mode={_mode_name(plan.mode)}: torch could not capture the training step as "
                f"CUDA graphs ({reason}) and would have run it without them, launch by launch. Run with "
                "trainer.compile_mode=max_autotune_no_cudagraphs or default, or trainer.compile=false"
            ) from err


@contextmanager
def _assigned(settings: list[tuple[Any, dict[str, Any]]]) -> Iterator[None]:
    """torch's config values set for a block and restored after it, by plain assignment: the step
    pays this on every batch, 15 microseconds against 61 with torch's `config.patch` (a CUDA-graph
    mode with buckets, measured on the 2-core CPU machine)."""
    saved = [(config, {name: getattr(config, name) for name in values}) for config, values in settings]
    for config, values in settings:
        for name, value in values.items():
            setattr(config, name, value)
    try:
        yield
    finally:
        for config, values in saved:
            for name, value in values.items():
                setattr(config, name, value)


def _cudagraph_skip(err: BaseException) -> Optional[str]:
    """torch's reason for not capturing CUDA graphs, from an error or the errors it wraps."""
    from mdfnet_hydra.files import error_chain

    for cause in error_chain(err):
        found = CUDAGRAPH_SKIP.search(str(cause))
        if found:
            return found.group(0).strip()
    return None


def _mode_name(torch_mode: str) -> str:
    return next(name for name, value in MODES.items() if value == torch_mode)
