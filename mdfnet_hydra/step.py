"""One training step: a micro-batch's forward, loss and scaled backward, and at the end of each
accumulation window the optimizer step (unscale, clip, step, scaler update, scheduler). The trainer
runs it for every batch and the benchmark times it, so the benchmark measures the trainer's step.

Under `trainer.compile` the step compiles its forward here (compiling.py): with `trainer.compile_loss`
the model and the loss as one graph (`ForwardLoss`), so the loss's small kernels (a few dozen forward
and backward) run inside the compiled, and on a GPU CUDA-graphed, step instead of one launch each;
otherwise the model alone. Around a DDP module torch runs DDP's own forward (its bucketing hooks)
eagerly between the graphs, so there the loss compiles as a graph of its own after the model's.

Within an accumulation window only the last backward all-reduces gradients (DDP's `no_sync`).
With `trainer.grad_accum_foreach` (default true) the window's gradients are summed outside autograd
(`GradientSums`): each backward starts from no gradients, so autograd hands its new gradients over
without a kernel, and the step adds them to the window's sums in one multi-tensor add, where
autograd's own accumulation into `.grad` launches an add per parameter tensor (about 150 for the
default model, twice that at real size: more launches than the whole compiled step). The sums are
the same numbers (the same additions in the same order). It holds the window's sums beside a
backward's new gradients, one more copy of the gradients at the peak; `false` keeps autograd's.
Under CUDA graphs (`own_grads`) the sums always live outside autograd, in buffers of the step's own:
the gradients a backward hands over live in the graphs' memory pool and the next replay overwrites
them (torch's CUDA graph trees then raise "accessing tensor output of CUDAGraphs that has been
overwritten", pytorch/pytorch#169545), so the window's first are copied out with one multi-tensor
copy. The 1 / accumulation scaling of each micro-batch's loss is part of the compiled graph. The
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
    """A micro-batch's forward under the run's autocast, its loss in fp32 and the share of it the
    backward differentiates (1 / accumulation), as one module: what compiles as one graph under
    `trainer.compile_loss`."""

    def __init__(self, forward: Callable[[dict], torch.Tensor], loss_fn, runtime, accumulation: int = 1) -> None:
        super().__init__()
        self.model = forward  # the model, its DDP wrapper, or the compiled model
        self.loss_fn = loss_fn
        self.runtime = runtime
        self.accumulation = accumulation

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[LossTerms, torch.Tensor]:
        with self.runtime.autocast():
            logits = self.model(batch)
        terms = self.loss_fn(logits, batch["targets"], batch["mask"])
        return terms, terms.total / self.accumulation if self.accumulation > 1 else terms.total


class GradientSums:
    """An accumulation window's gradients, summed outside autograd: after each backward but the
    window's last, the new gradients are added to the sums in one multi-tensor add (the window's
    first are taken as they are, or copied into the step's own buffers with `copy`: under CUDA graphs)
    and the parameters' `.grad` cleared, so the next backward hands its gradients over without a
    kernel. `finish` adds the sums into the last backward's gradients; `restore` puts them back
    before a backward that must see them (DDP's all-reducing one)."""

    def __init__(self, params: list[torch.nn.Parameter], copy: bool) -> None:
        self.params = params
        self.copy = copy
        self.sums: list[Optional[torch.Tensor]] = [None] * len(params)
        self.buffers: list[Optional[torch.Tensor]] = [None] * len(params)  # `copy`'s, kept across windows

    def take(self, first: bool) -> None:
        """After a backward that does not end the window."""
        if first:
            self.sums = [None] * len(self.params)
        grads = [p.grad for p in self.params]
        adds = [i for i, (g, s) in enumerate(zip(grads, self.sums)) if g is not None and s is not None]
        if adds:
            torch._foreach_add_([self.sums[i] for i in adds], [grads[i] for i in adds])
        new = [i for i, (g, s) in enumerate(zip(grads, self.sums)) if g is not None and s is None]
        if new and self.copy:
            for i in new:
                if self.buffers[i] is None or self.buffers[i].shape != grads[i].shape:
                    self.buffers[i] = torch.empty_like(grads[i])
            torch._foreach_copy_([self.buffers[i] for i in new], [grads[i] for i in new])
        for i in new:
            self.sums[i] = self.buffers[i] if self.copy else grads[i]
        for p in self.params:
            p.grad = None

    def finish(self) -> None:
        """After the window's last backward: `.grad` holds the window's total."""
        pairs = [(p.grad, s) for p, s in zip(self.params, self.sums) if p.grad is not None and s is not None]
        if pairs:
            torch._foreach_add_([g for g, _ in pairs], [s for _, s in pairs])
        for p, s in zip(self.params, self.sums):
            if p.grad is None and s is not None:
                p.grad = s
        self.sums = [None] * len(self.params)

    def restore(self) -> None:
        """Before the window's last backward when it must add into the sums itself (DDP all-reduces
        `.grad` as that backward leaves it)."""
        for p, s in zip(self.params, self.sums):
            p.grad = s
        self.sums = [None] * len(self.params)


def compiled_forward_loss(
    forward: torch.nn.Module, loss_fn, runtime, plan: Optional["CompilePlan"], with_loss: bool, accumulation: int = 1
) -> Callable[[dict], tuple[LossTerms, torch.Tensor]]:
    """The step's forward and loss: eager without a plan; with one, compiled together (`with_loss`)
    or the model compiled alone. Around a DDP module torch breaks the frame at DDP's forward (3
    breaks, its bucketing hooks run eagerly), compiles the module inside it, and the loss after it
    as a second graph (under autocast a third, empty but for autocast's entry, before the break):
    on a gloo process group the eager step's losses and weights in fp32 and bf16, 2.3x fewer
    operators outside the graphs per step than with the loss eager (tests/test_step.py); not yet
    run with NCCL on GPUs."""
    if plan is None:
        return ForwardLoss(forward, loss_fn, runtime, accumulation)
    from mdfnet_hydra.compiling import compile_forward

    if with_loss:
        return compile_forward(ForwardLoss(forward, loss_fn, runtime, accumulation), plan)
    return ForwardLoss(compile_forward(forward, plan), loss_fn, runtime, accumulation)


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
        own_grads: Optional[bool] = None,
        compile_plan: Optional["CompilePlan"] = None,
        compile_loss: bool = True,
        foreach: bool = True,
    ) -> None:
        self.module = forward  # the model or its DDP wrapper (whose no_sync a window's first batches use)
        self.accumulation = max(1, int(accumulation))
        # under a compile plan the forward (and the loss, `compile_loss`) compile here
        self.compile_plan = compile_plan
        self.forward_loss = compiled_forward_loss(
            forward, loss_fn, runtime, compile_plan, compile_loss, self.accumulation
        )
        self.loss_in_graph = isinstance(getattr(self.forward_loss, "_orig_mod", None), ForwardLoss)
        self.optimizer = optimizer
        self.runtime = runtime
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.scheduler = scheduler
        self.scaler = runtime.grad_scaler()  # active for fp16 only
        self.trainable = [p for group in optimizer.param_groups for p in group["params"]]
        if own_grads is None:  # the gradients live in CUDA graphs' memory where the plan records graphs
            own_grads = compile_plan is not None and compile_plan.records_graphs_on(runtime.device)
        self.own_grads = bool(own_grads) and self.accumulation > 1  # a one-batch window steps before any replay
        # a window's gradients summed outside autograd (`foreach`), always under CUDA graphs
        self.sums = (
            GradientSums(self.trainable, copy=self.own_grads)
            if self.accumulation > 1 and (foreach or self.own_grads)
            else None
        )

    def __call__(self, batch: dict[str, torch.Tensor], index: int, measure_norm: bool = False) -> StepResult:
        """The `index`-th micro-batch of an epoch (already on the device); `measure_norm`: compute
        the gradient norm even without clipping (the trainer's logging steps)."""
        position = index % self.accumulation
        syncing = position == self.accumulation - 1
        distributed = self.runtime.distributed
        if self.sums is not None and syncing and distributed:
            self.sums.restore()  # DDP all-reduces what this backward leaves in .grad: the window's total
        # a distributed forward is DDP's: its no_sync must exist
        with self.module.no_sync() if not syncing and distributed else nullcontext():
            with self._compiled(batch):  # where torch compiles and captures: its limits enforced
                terms, objective = self.forward_loss(batch)
                self.scaler.scale(objective).backward()
        if not syncing:
            if self.sums is not None:
                self.sums.take(first=position == 0)
            return StepResult(terms, False, None)
        if self.sums is not None and not distributed:
            self.sums.finish()
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
