"""Grad-CAM over the vision encoder's patch tokens: where in the image a label's logit comes from.

The final token states of the vision encoder (captured by a hook on the layer it names as their
source, `token_layer`, so pooled and token outputs both work) are weighted by the gradient of the label's logit; the positive part, per
patch, is upsampled onto the image. Shown next to the original for the test images the model is
most confident about for each label.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mdfnet_hydra.labels import CHEXPERT_LABELS, tag_name


def grad_cam(model, batch: dict[str, torch.Tensor], label: int) -> np.ndarray:
    """(B, h, w) maps in [0, 1] for one label."""
    encoder = model.encoders["vision"]
    captured = {}

    def keep(_module, _inputs, output):
        # a leaf here: the backward pass stops at the tokens instead of running through the encoders
        captured["tokens"] = output.detach().requires_grad_(True)
        return captured["tokens"]

    handle = encoder.token_layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(batch)
            tokens = captured["tokens"]
            (grad,) = torch.autograd.grad(logits[:, label].sum(), tokens)
    finally:
        handle.remove()
    cam = torch.relu((grad * tokens).sum(-1))[:, encoder.num_prefix_tokens :].detach()
    side = int(math.isqrt(cam.shape[1]))
    cam = cam[:, : side * side].reshape(-1, side, side)
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return cam.cpu().numpy()


def saliency_maps(
    model, dataset, pad_id: int, probs: np.ndarray, per_label: int, out: Path, device: torch.device
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mdfnet_hydra.data.dataset import Collator, unreadable_image

    split = dataset.split
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for j, name in enumerate(CHEXPERT_LABELS):
        positives = np.flatnonzero((split.mask[:, j] > 0) & (split.targets[:, j] > 0.5))
        chosen = positives[np.argsort(-probs[positives, j])][:per_label]
        if len(chosen) == 0:
            continue
        batch = Collator(pad_id)([dataset[int(i)] for i in chosen])
        batch = {k: v.to(device) for k, v in batch.items()}
        maps = grad_cam(model, batch, j)
        size = batch["image"].shape[-1]
        fig, axes = plt.subplots(len(chosen), 2, figsize=(8, 4 * len(chosen)), squeeze=False)
        for row, (index, cam) in enumerate(zip(chosen, maps)):
            try:
                with Image.open(dataset.image_paths[index]) as image:
                    original = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BICUBIC))
            except OSError as err:
                raise unreadable_image(split, int(index), dataset.image_paths[index], err) from err
            heat = (
                np.asarray(
                    Image.fromarray((cam * 255).astype(np.uint8)).resize(
                        original.shape[::-1], Image.Resampling.BILINEAR
                    )
                )
                / 255
            )
            axes[row, 0].imshow(original, cmap="gray")
            axes[row, 0].set_title("test image")
            axes[row, 1].imshow(original, cmap="gray")
            axes[row, 1].imshow(heat, cmap="jet", alpha=0.45)
            axes[row, 1].set_title(f"Grad-CAM: {name} (p={probs[index, j]:.2f})")
            for ax in axes[row]:
                ax.axis("off")
        fig.tight_layout()
        path = out / f"{tag_name(name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
