"""The trainer's step (step.py) under gradient accumulation: the CUDA-graph handling of gradients
changes no number, and hands the optimizer gradients the step owns."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mdfnet_hydra.compiling import MODES, CompilePlan
from mdfnet_hydra.config import CompileMode, LossConfig, TrainerConfig
from mdfnet_hydra.losses import MultiLabelLoss
from mdfnet_hydra.runtime import Runtime
from mdfnet_hydra.step import TrainingStep


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 14))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.body(batch["x"])


def batches(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"x": torch.randn(4, 8, generator=g), "targets": (torch.rand(4, 14, generator=g) > 0.5).float(),
         "mask": torch.ones(4, 14)}
        for _ in range(n)
    ]  # fmt: skip


def adamw_step(precision: str = "fp32", **options) -> tuple[torch.nn.Module, TrainingStep]:
    """A fresh seeded model and the trainer's step over it (AdamW, the default loss)."""
    torch.manual_seed(0)
    model = Net()
    runtime = Runtime.from_config(OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"precision": precision}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, TrainingStep(model, optimizer, MultiLabelLoss(OmegaConf.structured(LossConfig)), runtime, **options)


def reference_weights(accumulation: int, passes: int = 2) -> list[torch.Tensor]:
    """Plain PyTorch gradient accumulation, written out (autograd sums each window's gradients in
    .grad): the weights the step must reproduce, with clipping at 1.0."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = MultiLabelLoss(OmegaConf.structured(LossConfig))
    for _ in range(passes):
        for i, batch in enumerate(batches()):
            (loss_fn(model(batch), batch["targets"], batch["mask"]).total / accumulation).backward()
            if (i + 1) % accumulation == 0:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("accumulation", [2, 3])
@pytest.mark.parametrize("own_grads, foreach", [(False, False), (False, True), (True, True), (True, False)])
def test_every_way_of_summing_a_window_gives_autograds_weights_exactly(accumulation, own_grads, foreach):
    """The window's gradients summed outside autograd (`trainer.grad_accum_foreach`; copied into the
    step's buffers under CUDA graphs, `own_grads`, whatever foreach says) or by autograd: the same
    additions in the same order, so bit for bit the weights of plain accumulation, over two passes."""
    model, step = adamw_step(accumulation=accumulation, own_grads=own_grads, foreach=foreach, max_grad_norm=1.0)
    assert (step.sums is not None) is (foreach or own_grads)
    for _ in range(2):
        for i, batch in enumerate(batches()):
            assert step(batch, i).stepped is ((i + 1) % accumulation == 0)
    for expected, actual in zip(reference_weights(accumulation), model.parameters()):
        assert torch.equal(expected, actual)


def test_under_cuda_graphs_the_sums_are_the_steps_own_buffers_reused_every_window():
    """own_grads: what a backward hands over lives in the graphs' memory, which the next replay
    overwrites: the window's sums are never a tensor autograd handed over, they are the same
    buffers in every window, and between micro-batches no parameter holds a gradient."""
    model, step = adamw_step(accumulation=3, own_grads=True)
    handed: list[torch.Tensor] = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: handed.append(p.grad))
    buffers = None
    for i, batch in enumerate(batches()):
        step(batch, i)
        if i % 3 == 2:
            continue
        assert all(p.grad is None for p in model.parameters())
        sums = list(step.sums.sums)
        assert not any(s is h for s in sums for h in handed)
        buffers = buffers or sums
        assert all(a is b for a, b in zip(sums, buffers)), "allocated once, reused"


def test_the_sums_cost_a_few_operators_per_micro_batch_whatever_the_parameter_count():
    """torch.profiler's count of operators outside compiled graphs per micro-batch (what the
    benchmark's profile reports): autograd's accumulation adds one per parameter tensor in every
    micro-batch after a window's first; the sums add a fixed few however many tensors the model has."""
    import torch._dynamo
    from torch.profiler import profile

    from mdfnet_hydra.benchmarks.timing import launches

    def counted(depth: int, foreach: bool) -> float:
        class Deep(Net):
            def __init__(self) -> None:
                super().__init__()
                self.body = torch.nn.Sequential(
                    torch.nn.Linear(8, 16), *(torch.nn.Linear(16, 16) for _ in range(depth)), torch.nn.Linear(16, 14)
                )

        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Deep()
        runtime = Runtime.from_config(OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"precision": "fp32"}))
        step = TrainingStep(
            model,
            torch.optim.SGD(
                model.parameters(), lr=1e-2, foreach=True
            ),  # (foreach AdamW reads a step per tensor on a CPU)
            MultiLabelLoss(OmegaConf.structured(LossConfig)),
            runtime,
            accumulation=2,
            compile_plan=CompilePlan.of("default", [8], backend="aot_eager"),
            foreach=foreach,
        )
        staged = batches(4)
        for i, batch in enumerate(staged):  # compiled and warm
            step(batch, i)
        with profile() as prof:
            for i, batch in enumerate(staged):
                step(batch, i)
        return launches(prof.events(), len(staged))["eager_ops_per_step"]

    shallow, deep = counted(0, True), counted(20, True)
    assert deep == shallow, (shallow, deep)
    autograds = counted(20, False)
    tensors = 2 * 22
    assert autograds - deep >= tensors / 2 - 2, (autograds, deep)  # an add per tensor every other micro-batch


class Branching(Net):
    """A part that gets a gradient only from batches that ask for it."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.nn.Linear(8, 14)

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.body(batch["x"])
        return out + self.extra(batch["x"]) if batch.get("extra") else out


@pytest.mark.parametrize("own_grads", [True, False])
@pytest.mark.parametrize("extra_at", [0, 1, 2])
def test_a_part_with_a_gradient_in_some_micro_batches_only_gets_their_sum(own_grads, extra_at):
    """A part used by one micro-batch of the window (its first, a middle one, or its last) steps on
    that micro-batch's gradient: the same as autograd's accumulation; the parts every batch uses, too."""
    window = [dict(b) for b in batches(3)]
    window[extra_at]["extra"] = True
    weights = {}
    for summed in (True, False):
        torch.manual_seed(0)
        model = Branching()
        runtime = Runtime.from_config(OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"precision": "fp32"}))
        step = TrainingStep(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            MultiLabelLoss(OmegaConf.structured(LossConfig)),
            runtime,
            accumulation=3,
            own_grads=own_grads and summed,
            foreach=summed,
        )
        assert (step.sums is not None) is summed
        assert [step(b, i).stepped for i, b in enumerate(window)] == [False, False, True]
        weights[summed] = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    untrained = Branching()
    assert not torch.equal(weights[False][-1], untrained.extra.bias), "the extra part trained"
    for a, b in zip(weights[True], weights[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device, records", [("cuda", True), ("cpu", False)])
def test_the_gradients_are_copied_only_where_cuda_graphs_are_recorded(device, records):
    assert CompilePlan.of("reduce_overhead", [64]).records_graphs_on(torch.device(device)) is records
    assert CompilePlan.of("max_autotune", [64]).records_graphs_on(torch.device(device)) is records
    assert CompilePlan.of("default", [64]).records_graphs_on(torch.device(device)) is False


def test_a_one_batch_window_needs_no_copy():
    model = Net()
    runtime = Runtime.from_config(OmegaConf.structured(TrainerConfig))
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1), None, runtime, own_grads=True)
    assert step.own_grads is False  # the optimizer steps before any later replay


@pytest.mark.parametrize("mode", list(CompileMode))
def test_a_compile_plan_knows_whether_its_mode_records_cuda_graphs(mode):
    assert CompilePlan.of(mode, [64]).cuda_graphs == mode.cuda_graphs
    assert MODES[mode.value] == CompilePlan.of(mode, []).mode
    assert mode.cuda_graphs == (mode in (CompileMode.reduce_overhead, CompileMode.max_autotune))


def test_without_text_the_step_compiles_one_graph_and_a_second_shape_stops_it():
    """A run without report text has one batch shape whatever model.text.length_buckets says: one
    graph allowed, and the log says why; a batch of another shape stops the step."""
    import torch._dynamo

    plan = CompilePlan.of("default", [32, 128], backend="aot_eager", text=False)
    assert plan.static and plan.graph_limit == 1 and "no text input" in plan.describe_shapes()
    assert CompilePlan.of("default", [32, 128]).describe_shapes().startswith("static shapes, at most 2 graphs")
    torch._dynamo.reset()
    _, step = adamw_step(compile_plan=plan)
    for i, batch in enumerate(batches(2)):
        step(batch, i)
    odd = {k: v[:3] for k, v in batches(1)[0].items()}
    with pytest.raises(RuntimeError, match="needs a second compiled graph, where a run without text has one"):
        step(odd, 2)


# ---------------------------------------------------------------- the compiled step (trainer.compile_loss)
def compiled_run(plan, compile_loss: bool, accumulation: int = 2, precision: str = "fp32"):
    """The step over two passes of the batches: the model's weights, the losses, and the step."""
    model, step = adamw_step(
        precision,
        accumulation=accumulation,
        max_grad_norm=1.0,
        compile_plan=plan,
        compile_loss=compile_loss,
    )
    losses = [step(batch, i).terms.total.item() for _ in range(2) for i, batch in enumerate(batches())]
    return model, losses, step


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("compile_loss", [True, False])
def test_the_compiled_step_trains_like_the_eager_step(compile_loss, precision):
    """The step compiled (torch's AOT autograd without inductor's code generation: the graph capture
    under test, quick on a CPU) with the loss in the graph or outside it, in fp32 and under bf16
    autocast (the model only; the loss in fp32): the eager step's losses and weights over two
    passes with accumulation 2 and clipping, to 1e-6; one graph, no graph break."""
    import torch._dynamo

    from mdfnet_hydra.compiling import compile_counts

    eager, eager_losses, _ = compiled_run(None, compile_loss, precision=precision)
    torch._dynamo.reset()
    start = compile_counts()  # torch's counters are process-wide and survive the reset
    plan = CompilePlan.of("default", [8], backend="aot_eager")
    compiled, losses, step = compiled_run(plan, compile_loss, precision=precision)
    assert step.loss_in_graph is compile_loss
    counts = {k: v - start[k] for k, v in compile_counts().items()}
    assert counts["graphs"] == 1 and counts["graph_breaks"] == 0
    assert losses == pytest.approx(eager_losses, abs=1e-6)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_with_the_loss_in_the_graph_no_loss_operator_runs_eagerly():
    """torch.profiler's record of compiled steps: with trainer.compile_loss the loss's operators run
    inside the compiled region, and the operators computing outside it per step (what the
    benchmark's profile reports as eager_ops_per_step) are under half as many; without, the loss's
    operators run eagerly, one by one."""
    import torch._dynamo
    from torch.profiler import profile

    from mdfnet_hydra.benchmarks.timing import launches

    loss_ops = {"aten::binary_cross_entropy_with_logits", "aten::sigmoid", "aten::pow"}
    counted, ran_eagerly = {}, {}
    staged = batches(4)
    for compile_loss in (True, False):
        torch._dynamo.reset()
        _, _, step = compiled_run(CompilePlan.of("default", [8], backend="aot_eager"), compile_loss)
        with profile() as prof:
            for i, batch in enumerate(staged):
                step(batch, i)
        counted[compile_loss] = launches(prof.events(), len(staged))
        ran_eagerly[compile_loss] = {e.name for e in prof.events() if e.name in loss_ops and not _inside_compiled(e)}
    assert not ran_eagerly[True] and not loss_ops & set(counted[True]["eager_ops_top"])
    assert ran_eagerly[False] == loss_ops
    assert counted[True]["eager_ops_per_step"] < 0.5 * counted[False]["eager_ops_per_step"]
    assert counted[True]["kernel_launches_per_step"] is None  # a CPU: no CUDA launches


def _inside_compiled(event) -> bool:
    """Within a compiled graph's run (AOT autograd's forward or backward, inductor's code)."""
    parent = event.cpu_parent
    while parent is not None:
        if "CompiledFunction" in parent.name or "CompiledFxGraph" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


@pytest.fixture
def gloo_group():
    """A real one-process gloo process group (what DDP needs to wrap a module), destroyed after."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def ddp_run(plan, compile_loss: bool, precision: str = "fp32"):
    """compiled_run's two passes and 4 profiled micro-batches through a DDP module, as a rank's
    trainer runs them (no_sync within a window): weights, losses, the step, operators outside graphs."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.profiler import profile

    from mdfnet_hydra.benchmarks.timing import launches

    torch.manual_seed(0)
    model = Net()
    runtime = Runtime.from_config(OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"precision": precision}))
    runtime.world_size = 2  # what a DDP rank's runtime says: the step takes DDP's no_sync path
    step = TrainingStep(
        DistributedDataParallel(model),
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        MultiLabelLoss(OmegaConf.structured(LossConfig)),
        runtime,
        accumulation=2,
        max_grad_norm=1.0,
        compile_plan=plan,
        compile_loss=compile_loss,
    )
    losses = [step(batch, i).terms.total.item() for _ in range(2) for i, batch in enumerate(batches())]
    with profile() as prof:
        for i, batch in enumerate(batches(4)):
            step(batch, i)
    return model, losses, step, launches(prof.events(), 4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_around_a_ddp_module_the_loss_compiles_after_the_model(gloo_group, precision):
    """Under DDP (a real gloo process group) torch breaks the frame at DDP's forward and compiles the
    module inside it; with trainer.compile_loss the loss compiles as a second graph: the eager DDP
    step's losses and weights over two passes with accumulation 2 and clipping, the same graph
    breaks as the model compiled alone, and under half the operators outside the graphs. In bf16
    the break falls inside the step's autocast block, which must hold on both sides of it."""
    import torch._dynamo

    from mdfnet_hydra.compiling import compile_counts

    eager, eager_losses, _, _ = ddp_run(None, True, precision)
    graphs, ops = {}, {}
    for compile_loss in (True, False):
        torch._dynamo.reset()
        start = compile_counts()
        plan = CompilePlan.of("default", [8], backend="aot_eager")
        model, losses, step, counted = ddp_run(plan, compile_loss, precision)
        assert step.loss_in_graph is compile_loss
        graphs[compile_loss] = {k: v - start[k] for k, v in compile_counts().items()}
        ops[compile_loss] = counted["eager_ops_per_step"]
        assert losses == pytest.approx(eager_losses, abs=1e-6)
        for a, b in zip(eager.parameters(), model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the loss's own graph; in bf16 also the frame's part before the break: autocast's entry alone
    assert graphs[True]["graphs"] == graphs[False]["graphs"] + (1 if precision == "fp32" else 2), graphs
    assert graphs[True]["graph_breaks"] == graphs[False]["graph_breaks"], graphs
    assert ops[True] < 0.5 * ops[False], ops


def test_a_graph_torch_cannot_capture_stops_the_step_with_torchs_reason():
    """In a CUDA-graph mode the compiled step turns torch's skip of a CUDA graph (a warning, then the
    graph runs uncaptured) into an error naming torch's reason and what to run instead: torch's own
    skip path (`log_cudagraph_skip_and_bump_counter`, which its GPU compile and replay call) raises
    under the flag the step sets, also when wrapped by another error. Modes without CUDA graphs, and
    code outside the step, keep torch's warning; the epoch line's counter counts each skip."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    from mdfnet_hydra.compiling import compile_counts, compiled_step

    reason = "skipping cudagraphs due to mutated inputs (1 instances)"
    message = r"trainer.compile_mode=reduce_overhead: torch could not capture .*\(skipping cudagraphs due to mutated"
    for buckets in ([8], []):  # static shapes or not
        with pytest.raises(RuntimeError, match=message):
            with compiled_step(CompilePlan.of("reduce_overhead", buckets), {}):
                log_cudagraph_skip_and_bump_counter(reason)
    with pytest.raises(RuntimeError, match=message):
        with compiled_step(CompilePlan.of("reduce_overhead", [8]), {}):
            try:
                log_cudagraph_skip_and_bump_counter(reason)
            except RuntimeError as err:
                raise ValueError("the backend failed") from err
    before = compile_counts()["cudagraph_skips"]
    for plan in (CompilePlan.of("default", [8]), CompilePlan.of("max_autotune_no_cudagraphs", [])):
        with compiled_step(plan, {}):
            log_cudagraph_skip_and_bump_counter(reason)  # a warning only
    log_cudagraph_skip_and_bump_counter(reason)  # outside the step: the flag is restored
    assert compile_counts()["cudagraph_skips"] == before + 3
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass unchanged
        with compiled_step(CompilePlan.of("reduce_overhead", [8]), {}):
            raise ValueError("unrelated")


def test_the_operator_count_sees_the_eager_code_between_the_graphs_of_a_broken_frame():
    """torch marks a whole compiled frame as one region, the eager code at a graph break included:
    the count takes only the graphs' runs as compiled, so operators run eagerly between two graphs
    count and the graphs' own do not."""
    import torch._dynamo
    from torch.profiler import profile

    from mdfnet_hydra.benchmarks.timing import launches

    @torch._dynamo.disable
    def eager_part(x: torch.Tensor) -> torch.Tensor:
        return x * x.detach().sin().cos()  # (sin and cos run in the forward only)

    def step(x: torch.Tensor) -> torch.Tensor:
        return eager_part(x.exp()).tanh().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    x = torch.randn(8, requires_grad=True)
    compiled(x).backward()
    with profile() as prof:
        for _ in range(3):
            compiled(x).backward()
    counted = launches(prof.events(), 3)["eager_ops_top"]
    assert {"aten::sin", "aten::cos"} <= set(counted)
    assert not {"aten::exp", "aten::tanh", "aten::sum"} & set(counted), "inside the two graphs"
