"""The training step loop does not wait on the device: the operations that force a host-device
synchronisation on a GPU (.item(), float(), bool(), .cpu(), .tolist(), .numpy(), nonzero, boolean
mask indexing, unique) run a fixed number of times per epoch (logging, the epoch summary,
validation), not once per step. Counted on CPU with a TorchFunctionMode that sees every call of
them made from this project's code (directly or through torch functions it calls), apart from the
input pipeline (host-side by design: DataLoader workers on CPU tensors) and torch's optimizers
(their step counters live on the device with fused AdamW, on the host on purpose otherwise)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from conftest import make_cfg
from mdfnet_hydra.pipeline import run

PACKAGE = str(Path(__file__).resolve().parents[1] / "mdfnet_hydra")
DATA = str(Path(PACKAGE) / "data")
TORCH = str(Path(torch.__file__).parent)
OPTIM = str(Path(TORCH) / "optim")
SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.unique,
    torch.Tensor.unique,
}


def _syncs(func, args, kwargs) -> bool:
    if func in SYNCING:
        return True
    if func is torch.Tensor.__getitem__:  # boolean-mask indexing sizes its output from the data
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


class SyncCounter(TorchFunctionMode):
    """Counts syncing calls by the project's source line that (directly or via torch) made them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            frame = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_filename == __file__
            ):
                if frame.f_code.co_filename.startswith(OPTIM):
                    return func(
                        *args, **kwargs
                    )  # its step counts: on the device (fused AdamW) or on purpose on the host
                frame = frame.f_back
            source = frame.f_code.co_filename if frame is not None else ""
            if source.startswith(PACKAGE) and not source.startswith(DATA):  # the input pipeline is host-side work
                self.calls[f"{Path(source).name}:{frame.f_lineno} ({frame.f_code.co_name})"] += 1
        return func(*args, **kwargs)


def _count(tmp_path: Path, output_root: Path, steps: int, *overrides: str) -> Counter:
    cfg = make_cfg(
        [
            "debug=fast",
            "data.small_sample=null",
            "modality=all",
            "trainer.log_every_n_steps=1000",
            f"trainer.limit_train_batches={steps}",
            f"paths.cache_dir={tmp_path / f'cache{steps}'}",
            *overrides,
        ],
        tmp_path / f"run{steps}",
        output_root,
    )
    counter = SyncCounter()
    with counter:
        run(cfg)
    return counter.calls


def test_syncs_per_epoch_do_not_grow_with_the_number_of_steps(tmp_path, output_root):
    """Both stages (stage 1 from the feature cache), gradient accumulation and clipping every step."""
    overrides = ["trainer.grad_accum=2", "trainer.max_grad_norm=1.0"]
    few, many = _count(tmp_path, output_root, 2, *overrides), _count(tmp_path, output_root, 6, *overrides)
    assert sum(few.values()) > 0, "the counter sees the logging and validation syncs"
    assert many == few, f"syncs that grow with the steps: {dict(many - few)}"
