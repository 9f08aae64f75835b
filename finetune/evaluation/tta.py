"""Test-time crop averaging: one decode and one resize per image, several crops, mean of softmax.

Modes:

* ``none`` / ``center``: the plain eval transform (resize + centre crop), one view. ``none`` only
  means that no extra TTA metric is reported.
* ``5crop``: the image is resized exactly as the eval transform does (shorter side =
  ``input_size / crop_pct``), then the four corner crops and the centre crop of ``input_size``.
* ``10crop``: those five plus their horizontal flips.

The crops are cut from the resized, normalised tensor (normalisation is per pixel, so it commutes
with cropping), with torchvision's own ``five_crop`` / ``ten_crop``. The centre view is therefore
pixel-identical to the eval transform used in validation and serving.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from finetune import runtime
from finetune.data.crops import CropViews, ViewsDataset, collate_views


def average_softmax(logits: torch.Tensor, views: int) -> torch.Tensor:
    """Logits of ``[images * views, classes]`` (views of one image adjacent) -> mean probabilities."""
    probs = logits.float().softmax(dim=-1)
    return probs.view(-1, views, probs.shape[-1]).mean(dim=1)


@torch.no_grad()
def predict_views(net: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """A batch ``[B, V, 3, H, W]`` -> class probabilities ``[B, K]``.

    The B*V crops go through the network B at a time: the forward batch stays the one the user chose
    for images. One forward over all of them (10x the batch with 10crop) runs slower per crop: its
    activations no longer fit the caches (docs/decisions.md).
    """
    v = views.shape[1]
    flat = views.flatten(0, 1)
    logits = torch.cat([net(part) for part in flat.split(views.shape[0])])
    return average_softmax(logits, v)


def predict_sources(net: nn.Module, sources: Sequence[Any], data_config: dict[str, Any], mode: str,
                    batch_size: int = 32, max_pixels: int | None = None,
                    rt: runtime.Runtime | None = None) -> tuple[torch.Tensor, list[str]]:
    """Probabilities ``[N, K]`` (CPU) for N images (rows of failed images are NaN) and one error per image.

    The network runs on `rt`'s device and precision (the CPU when not given) and is left where it was.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    rt = rt or runtime.cpu()
    ds = ViewsDataset(sources, CropViews(data_config, mode), data_config, max_pixels)
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_views, **rt.loader_kwargs())
    out: list[torch.Tensor] = []
    errors: list[str] = []
    # Minutes for a large split on a CPU (more with 10crop): show progress.
    bar = tqdm(loader, desc=f"Predicting {len(ds)} images ({mode})", unit="batch", dynamic_ncols=True, leave=False)
    with runtime.evaluating_on(net, rt.device), rt.autocast():
        for views, _, errs in bar:
            probs = predict_views(net, views.to(rt.device, non_blocking=True)).cpu().clone()
            bad = torch.tensor([bool(e) for e in errs])
            probs[bad] = float("nan")
            out.append(probs)
            errors.extend(errs)
    return torch.cat(out) if out else torch.empty(0, 0), errors

