"""One training step: a micro-batch's forward, loss and scaled backward, and at the end of each
accumulation window the optimizer step (unscale, clip, step, scaler update, scheduler). The trainer
runs it for every batch and the benchmark times it, so the benchmark measures the trainer's step.

Under `trainer.compile` the step compiles its forward here (compiling.py): with `trainer.compile_loss`
the model and the loss as one graph (`ForwardLoss`), so the loss's small kernels (a few dozen forward
and backward) run inside the compiled, and on a GPU CUDA-graphed, step instead of one launch each;
otherwise the model alone. Around a DDP module torch runs DDP's own forward (its bucketing hooks)
eagerly between the graphs, so there the loss compiles as a graph of its own after the model's.

Within an accumulation window only the last backward all-reduces gradients (DDP's `no_sync`).
Under CUDA graphs (`own_grads`) a window's gradients are copied out of the graphs' memory pool
before the next micro-batch, each the first time it appears: the gradient tensors a backward hands
over live in that pool and the next replay overwrites them (torch's CUDA graph trees then raise
"accessing tensor output of CUDAGraphs that has been overwritten", pytorch/pytorch#169545); later
backwards of the window add into the copies in place. The
step reads nothing back to the host: the gradient norm is computed only when clipping or asked
for (a logging step), and stays a device tensor.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from mdfnet_hydra.losses import LossTerms

if TYPE_CHECKING:  # (compiling.py is imported only when a step compiles)
    from mdfnet_hydra.compiling import CompilePlan


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on the step's device (asynchronous from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class StepResult:
    terms: LossTerms  # the micro-batch's loss terms (device tensors, not detached)
    stepped: bool  # whether this micro-batch ended an accumulation window and the optimizer stepped
    grad_norm: Optional[torch.Tensor]  # the total gradient norm before clipping, when computed


class ForwardLoss(torch.nn.Module):
    """A micro-batch's forward under the run's autocast and its loss in fp32, as one module: what
    compiles as one graph under `trainer.compile_loss`."""

    def __init__(self, forward: Callable[[dict], torch.Tensor], loss_fn, runtime) -> None:
        super().__init__()
        self.model = forward  # the model, its DDP wrapper, or the compiled model
        self.loss_fn = loss_fn
        self.runtime = runtime

    def forward(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        with self.runtime.autocast():
            logits = self.model(batch)
        return self.loss_fn(logits, batch["targets"], batch["mask"])


def compiled_forward_loss(
    forward: torch.nn.Module, loss_fn, runtime, plan: Optional["CompilePlan"], with_loss: bool
) -> Callable[[dict], LossTerms]:
    """The step's forward and loss: eager without a plan; with one, compiled together (`with_loss`)
    or the model compiled alone. Around a DDP module torch breaks the frame at DDP's forward (3
    breaks, its bucketing hooks run eagerly), compiles the module inside it, and the loss after it
    as a second graph (under autocast a third, empty but for autocast's entry, before the break):
    on a gloo process group the eager step's losses and weights in fp32 and bf16, 2.3x fewer
    operators outside the graphs per step than with the loss eager (tests/test_step.py); not yet
    run with NCCL on GPUs."""
    if plan is None:
        return ForwardLoss(forward, loss_fn, runtime)
    from mdfnet_hydra.compiling import compile_forward

    if with_loss:
        return compile_forward(ForwardLoss(forward, loss_fn, runtime), plan)
    return ForwardLoss(compile_forward(forward, plan), loss_fn, runtime)


class TrainingStep:
    def __init__(
        self,
        forward: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn,
        runtime,
        accumulation: int = 1,
        max_grad_norm: Optional[float] = None,
        scheduler: Any = None,
        own_grads: bool = False,
        compile_plan: Optional["CompilePlan"] = None,
        compile_loss: bool = True,
    ) -> None:
        self.module = forward  # the model or its DDP wrapper (whose no_sync a window's first batches use)
        # under a compile plan the forward (and the loss, `compile_loss`) compile here
        self.compile_plan = compile_plan
        self.forward_loss = compiled_forward_loss(forward, loss_fn, runtime, compile_plan, compile_loss)
        self.loss_in_graph = isinstance(getattr(self.forward_loss, "_orig_mod", None), ForwardLoss)
        self.optimizer = optimizer
        self.runtime = runtime
        self.accumulation = max(1, int(accumulation))
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.scheduler = scheduler
        self.scaler = runtime.grad_scaler()  # active for fp16 only
        self.trainable = [p for group in optimizer.param_groups for p in group["params"]]
        self.own_grads = bool(own_grads) and self.accumulation > 1  # a one-batch window steps before any replay
        self._owned: set[int] = set()  # ids of the parameters whose gradient this window already copied

    def __call__(self, batch: dict[str, torch.Tensor], index: int, measure_norm: bool = False) -> StepResult:
        """The `index`-th micro-batch of an epoch (already on the device); `measure_norm`: compute
        the gradient norm even without clipping (the trainer's logging steps)."""
        syncing = (index + 1) % self.accumulation == 0
        # a distributed forward is DDP's: its no_sync must exist
        with self.module.no_sync() if not syncing and self.runtime.distributed else nullcontext():
            with self._compiled(batch):  # where torch compiles and captures: its limits enforced
                terms = self.forward_loss(batch)
                objective = terms.total / self.accumulation if self.accumulation > 1 else terms.total
                self.scaler.scale(objective).backward()
        if not syncing:
            if self.own_grads:
                self._own_new_grads(first=index % self.accumulation == 0)
            return StepResult(terms, False, None)
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.max_grad_norm is not None or measure_norm:
            limit = self.max_grad_norm if self.max_grad_norm is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, limit)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return StepResult(terms, True, grad_norm)

    def _compiled(self, batch: dict):
        if self.compile_plan is None:
            return nullcontext()
        from mdfnet_hydra.compiling import compiled_step

        return compiled_step(self.compile_plan, batch)

    def _own_new_grads(self, first: bool) -> None:
        """Replace each gradient this window has not copied yet with a copy (the window's first
        micro-batch starts the record afresh)."""
        if first:
            self._owned.clear()
        for p in self.trainable:
            if p.grad is not None and id(p) not in self._owned:
                p.grad = p.grad.clone()
                self._owned.add(id(p))
