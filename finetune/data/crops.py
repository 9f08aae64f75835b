"""Test-time crops: one decode and one resize per image, several crops cut from the tensor."""

from __future__ import annotations

from typing import Any, Sequence

from PIL import Image
import torch
from torch.utils.data import Dataset
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from finetune.data.images import ImageError, display_path, load_rgb
from finetune.data.transforms import eval_transform, resize_size
from finetune.errors import UserError

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

    def __repr__(self) -> str:  # stable: part of the feature cache's key
        return f"CropViews({self.mode}, {self.transform!r})"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.views == 1:
            return self.transform(img).unsqueeze(0)
        full = self.to_tensor(self.resize(img))
        crops = TF.five_crop(full, list(self.crop_size)) if self.views == 5 else TF.ten_crop(full, list(self.crop_size))
        return torch.stack(crops)


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
