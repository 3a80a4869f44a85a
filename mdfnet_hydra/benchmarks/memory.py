"""The full model's stage-2 peak memory on any machine: two training steps traced with fake tensors
(shapes and dtypes only, nothing computed or allocated) under torch's MemTracker."""

from __future__ import annotations

import logging

import torch

from mdfnet_hydra.benchmarks.workload import Setup, optimizer_for

log = logging.getLogger(__name__)


def _fake_parameters(module: torch.nn.Module, mode) -> None:
    """Swap every parameter and buffer for a fake tensor of the same shape, dtype and grad flag."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = mode.from_tensor(b)


def estimate_step_memory(setup: Setup, batch: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Peak memory (GB, by kind) of stage-2 training steps of `setup`'s model on `batch` under
    `dtype` autocast, traced with fake tensors by torch's MemTracker: shapes and dtypes only,
    nothing computed or allocated. Two steps, so the optimizer state exists at the peak. These are
    the bytes a GPU's allocator would hand out for the step (without the CUDA context, cuBLAS
    workspaces and fragmentation): how a CPU-only machine checks a GPU memory budget."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from mdfnet_hydra.losses import MultiLabelLoss

    cfg = setup.cfg
    model = setup.job.build_model()
    model.set_encoders_frozen(False)
    model.train()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        _fake_parameters(model, mode)
        fake = {k: mode.from_tensor(v) for k, v in batch.items()}
        optimizer = optimizer_for(model, cfg, "stage2")
        loss_fn = MultiLabelLoss(cfg.loss)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for _ in range(2):
                with torch.autocast("cpu", dtype=dtype):
                    logits = model(fake)
                loss_fn(logits, fake["targets"], fake["mask"]).total.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    result = {(k if isinstance(k, str) else k.value).lower(): v / 2**30 for k, v in peak.items()}
    result["dtype"] = str(dtype).removeprefix("torch.")
    log.info(
        "%-22s %9s           estimated peak %.2f GB in %s (parameters %.2f, optimizer %.2f, activations %.2f)",
        "stage2 memory",
        "",
        result["total"],
        result["dtype"],
        result["parameter"],
        result["optstate"],
        result["activation"],
    )
    return result
