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

import contextlib
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from finetune import runtime
from finetune.data.crops import TTA_VIEWS, CropViews, ViewsDataset, collate_views
from finetune.model.outputs import LogitsAndFeatures, Outputs
from finetune.model.scoring import Scoring, pooled_features


def _outputs_module(net: Any) -> Any:
    """`net` as a callable images -> (logits, features): a network is wrapped, a runner that already returns
    both (an ONNX session, `LogitsAndFeatures`) is used as it is."""
    return net if getattr(net, "returns_features", False) or isinstance(net, LogitsAndFeatures) else LogitsAndFeatures(net)


@torch.no_grad()
def forward_views(net: Any, views: torch.Tensor, per_pass: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch ``[B, V, 3, H, W]`` -> logits ``[B, V, K]`` and features ``[B, V, C]`` (the classifier's input).

    The B*V crops go through the network B (or `per_pass`) at a time: the forward batch stays the one the
    user chose for images. One forward over all of them (10x the batch with 10crop) runs slower per crop:
    its activations no longer fit the caches (docs/decisions.md).
    """
    b, v = views.shape[:2]
    run = _outputs_module(net)
    module = isinstance(run, LogitsAndFeatures)  # a network: its images in its weights' layout (evaluating_on)
    outs = [run(runtime.channels_last(part) if module else part) for part in views.flatten(0, 1).split(per_pass or b)]
    logits = torch.cat([o[0] for o in outs]).float()
    feats = torch.cat([o[1] for o in outs]).float()
    return logits.view(b, v, -1), feats.view(b, v, -1)


@torch.no_grad()
def score_views(net: Any, views: torch.Tensor, scoring: Scoring,
                per_pass: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch ``[B, V, 3, H, W]`` -> the model's calibrated probabilities ``[B, K]`` and unknown scores ``[B]``."""
    logits, feats = forward_views(net, views, per_pass)
    return scoring.probs(logits), scoring.ood_score(feats)


def predict_sources(net: nn.Module, sources: Sequence[Any], data_config: dict[str, Any], mode: str,
                    batch_size: int = 32, max_pixels: int | None = None,
                    rt: runtime.Runtime | None = None, per_view: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Probabilities ``[N, K]`` (CPU, uncalibrated) for N images (rows of failed images are NaN) and one error
    per image; ``[N, V, K]`` with ``per_view``."""
    out = source_outputs(net, sources, data_config, mode, batch_size, max_pixels, rt)
    probs = out.logits.softmax(dim=-1)
    return (probs if per_view else probs.mean(dim=1)), out.errors


def source_outputs(net: Any, sources: Sequence[Any], data_config: dict[str, Any], mode: str,
                   batch_size: int = 32, max_pixels: int | None = None, rt: runtime.Runtime | None = None,
                   pool: bool = False) -> Outputs:
    """Logits and features of every crop of N images; the network runs on `rt`'s device and precision (the
    CPU when not given) and is left where it was."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    rt = rt or runtime.cpu()
    ds = ViewsDataset(sources, CropViews(data_config, mode), data_config, max_pixels)
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_views, **rt.loader_kwargs())
    logits, feats, errors = [], [], []
    # Minutes for a large split on a CPU (more with 10crop): show progress.
    bar = tqdm(loader, desc=f"Predicting {len(ds)} images ({mode})", unit="batch", dynamic_ncols=True, leave=False)
    # An ONNX Runtime session is not a module: it has no device or mode to set.
    placed = runtime.evaluating_on(net, rt.device) if isinstance(net, nn.Module) else contextlib.nullcontext()
    with placed, rt.autocast(), runtime.inference_threads(rt):
        for views, _, errs in bar:
            z, f = forward_views(net, views.to(rt.device, non_blocking=True))
            z, f = z.cpu().clone(), (pooled_features(f)[:, None] if pool else f).cpu().clone()
            bad = torch.tensor([bool(e) for e in errs])
            z[bad], f[bad] = float("nan"), float("nan")
            logits.append(z)
            feats.append(f)
            errors.extend(errs)
    if not logits:
        return Outputs(torch.empty(0, TTA_VIEWS[mode], 0), torch.empty(0, 1, 0), [])
    return Outputs(torch.cat(logits), torch.cat(feats), errors)


# --- `--tta auto`: the crop mode chosen on data inside the training split -------------------------

# Scored from one 10-crop pass: torchvision's ten_crop is five_crop (four corners, then the centre) followed
# by the same five of the flipped image, so view 4 is the centre crop (pixel-identical to the eval
# transform), views 0-4 are 5crop and all ten are 10crop.
AUTO_CANDIDATES = {"center": [4], "5crop": [0, 1, 2, 3, 4], "10crop": list(range(10))}


def mode_scores(per_view: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Accuracy and mean negative log-likelihood of every candidate mode from per-view probabilities
    ``[N, 10, K]`` (NaN rows: images that failed, left out)."""
    ok = ~np.isnan(per_view).any(axis=(1, 2))
    per_view, labels = per_view[ok], labels[ok]
    scores = {}
    for mode, views in AUTO_CANDIDATES.items():
        probs = per_view[:, views].mean(axis=1)
        p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
        scores[mode] = {"acc": float((probs.argmax(axis=1) == labels).mean()) if len(labels) else float("nan"),
                        "nll": float(-np.log(p_true).mean()) if len(labels) else float("nan"),
                        "views": len(views), "images": int(len(labels))}
    return scores


def pick_mode(scores: dict[str, dict[str, float]]) -> str:
    """The mode with the best accuracy; a tie goes to the cheaper mode (fewer views): more crops must
    earn their cost on held-out images."""
    return max(scores, key=lambda m: (scores[m]["acc"], -scores[m]["views"]))
