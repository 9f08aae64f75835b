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
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from finetune import runtime
from finetune.augment import eval_transform, resize_size
from finetune.errors import UserError
from finetune.images import ImageError, display_path, load_rgb

TTA_VIEWS = {"none": 1, "center": 1, "5crop": 5, "10crop": 10}


def check_mode(mode: str) -> str:
    if mode not in TTA_VIEWS:
        raise UserError(f"Invalid tta {mode!r}. Valid values: {', '.join(TTA_VIEWS)}.")
    return mode


def is_multi_crop(mode: str) -> bool:
    return TTA_VIEWS[check_mode(mode)] > 1


class CropViews:
    """PIL image -> tensor ``[views, 3, H, W]`` for a TTA mode, from the model's data config."""

    def __init__(self, data_config: dict[str, Any], mode: str = "center"):
        self.mode = check_mode(mode)
        self.views = TTA_VIEWS[mode]
        self.crop_size = tuple(int(s) for s in data_config["input_size"][-2:])
        self.transform = eval_transform(data_config)
        steps = list(self.transform.transforms)
        crops = [i for i, t in enumerate(steps) if isinstance(t, T.CenterCrop)]
        if self.views > 1:
            if len(crops) != 1:
                raise UserError(f"tta {mode} needs a resize + centre-crop eval transform, but this model's "
                                f"data config (crop_mode={data_config.get('crop_mode')!r}) has none. "
                                "Use --tta center.")
            # Everything before the centre crop resizes (PIL); everything after converts and normalises.
            self.resize = T.Compose(steps[:crops[0]])
            self.to_tensor = T.Compose(steps[crops[0] + 1:])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.views == 1:
            return self.transform(img).unsqueeze(0)
        full = self.to_tensor(self.resize(img))
        crops = TF.five_crop(full, list(self.crop_size)) if self.views == 5 else TF.ten_crop(full, list(self.crop_size))
        return torch.stack(crops)


def average_softmax(logits: torch.Tensor, views: int) -> torch.Tensor:
    """Logits of ``[images * views, classes]`` (views of one image adjacent) -> mean probabilities."""
    probs = logits.float().softmax(dim=-1)
    return probs.view(-1, views, probs.shape[-1]).mean(dim=1)


@torch.no_grad()
def predict_views(net: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """A batch ``[B, V, 3, H, W]`` -> class probabilities ``[B, K]``.

    The B*V crops go through the network B at a time: the forward batch stays the one the user chose
    for images. One forward over all of them (10x the batch with 10crop) ran 1.4-5x slower per crop
    on CPU in `bench/throughput.py`: its activations no longer fit the caches.
    """
    v = views.shape[1]
    flat = views.flatten(0, 1)
    logits = torch.cat([net(part) for part in flat.split(views.shape[0])])
    return average_softmax(logits, v)


class ViewsDataset(Dataset):
    """Image paths (or bytes) -> ``(views, index, error)``; a bad image gives a zero tensor and its error.

    Each file is decoded once (JPEGs at reduced scale when that still covers the resize), so a
    prediction over a folder never crashes and never silently drops a file.
    """

    def __init__(self, sources: Sequence[Any], crop_views: CropViews, data_config: dict[str, Any],
                 max_pixels: int | None = None):
        self.sources = sources
        self.crop_views = crop_views
        self.max_pixels = max_pixels
        size = resize_size(data_config)
        self.draft_size = (size, size)
        self.blank = torch.zeros(crop_views.views, 3, *crop_views.crop_size)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        source = self.sources[index]
        try:
            img = load_rgb(source, self.max_pixels, self.draft_size)
            return self.crop_views(img), index, ""
        except ImageError as e:
            return self.blank, index, str(e)
        except OSError as e:  # vanished, permission denied, a folder, ...
            where = "" if isinstance(source, (bytes, bytearray)) else f"{display_path(source)}: "
            return self.blank, index, f"{where}cannot read file ({e.strerror or e})"


def collate_views(batch):
    views, index, errors = zip(*batch)
    return torch.stack(views), torch.tensor(index), list(errors)


def predict_sources(net: nn.Module, sources: Sequence[Any], data_config: dict[str, Any], mode: str,
                    batch_size: int = 32, max_pixels: int | None = None,
                    rt: runtime.Runtime | None = None) -> tuple[torch.Tensor, list[str]]:
    """Probabilities ``[N, K]`` (CPU) for N images (rows of failed images are NaN) and one error per image.

    The network runs on `rt`'s device and precision (the CPU when not given) and is left where it was.
    """
    from torch.utils.data import DataLoader

    rt = rt or runtime.cpu()
    ds = ViewsDataset(sources, CropViews(data_config, mode), data_config, max_pixels)
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_views, **rt.loader_kwargs())
    out: list[torch.Tensor] = []
    errors: list[str] = []
    with runtime.evaluating_on(net, rt.device), rt.autocast():
        for views, _, errs in loader:
            probs = predict_views(net, views.to(rt.device, non_blocking=True)).cpu().clone()
            bad = torch.tensor([bool(e) for e in errs])
            probs[bad] = float("nan")
            out.append(probs)
            errors.extend(errs)
    return torch.cat(out) if out else torch.empty(0, 0), errors

