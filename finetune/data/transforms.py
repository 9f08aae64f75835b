"""Named augmentation presets, built with timm's `create_transform`.

The eval transform (resize + centre crop from the model's data config) is the single preprocessing
for validation, TTA, feature extraction and serving; training presets add augmentation on top.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from timm.data import Mixup, create_transform
from torchvision import transforms

from finetune.errors import UserError

PRESETS: dict[str, dict[str, Any]] = {
    # No augmentation: exactly the eval preprocessing.
    "none": {},
    # Gentle crops and flips: keeps objects recognisable for small datasets.
    "light": dict(scale=(0.5, 1.0), hflip=0.5, color_jitter=None),
    # + colour jitter and AlexNet's PCA lighting noise: invariance to lighting and white balance.
    "standard": dict(scale=(0.25, 1.0), hflip=0.5, color_jitter=0.3, lighting=0.1),
    # + RandAugment and random erasing: for larger datasets and long schedules.
    "strong": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, lighting=0.1,
                   auto_augment="rand-m9-mstd0.5", re_prob=0.25, re_mode="pixel"),
}

# Principal components of ImageNet's RGB pixel covariance (Krizhevsky et al. 2012, as published with
# fb.resnet.torch); pixels in [0, 1].
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


class PCALighting:
    """AlexNet-style lighting noise: add sum_i alpha_i * lambda_i * v_i to every pixel, alpha ~ N(0, std).

    Shifts colour along the natural image's principal colour axes (intensity and hue of the light),
    which timm and torchvision do not offer. Works on a [0, 1] CHW tensor, before normalisation.
    """

    def __init__(self, alphastd: float = 0.1, eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC):
        self.alphastd = alphastd
        self.eigval = torch.tensor(eigval)
        self.eigvec = torch.tensor(eigvec)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = self.eigvec @ (alpha * self.eigval)
        return img + rgb.view(3, 1, 1).to(img.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alphastd={self.alphastd})"


def _data_kwargs(data_config: dict[str, Any]) -> dict[str, Any]:
    return dict(
        input_size=tuple(data_config["input_size"]),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        interpolation=data_config.get("interpolation", "bilinear"),
        crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode", "center"),
    )


def eval_transform(data_config: dict[str, Any]) -> Callable:
    """Resize + centre crop + normalise, from the model's data config."""
    return create_transform(is_training=False, **_data_kwargs(data_config))


def eval_crop(data_config: dict[str, Any]) -> Callable:
    """The eval transform's PIL steps only (resize + centre crop): the pixels the network sees, unnormalised."""
    steps = list(eval_transform(data_config).transforms)
    tensor_at = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
    return transforms.Compose(steps[:tensor_at])


def train_transform(data_config: dict[str, Any], preset: str = "light") -> Callable:
    if preset not in PRESETS:
        raise UserError(f"Unknown augmentation preset {preset!r}. Valid presets: {', '.join(PRESETS)}.")
    if preset == "none":
        return eval_transform(data_config)
    kwargs = _data_kwargs(data_config)
    kwargs.pop("crop_pct")
    kwargs.pop("crop_mode")
    if kwargs["interpolation"] == "bicubic":
        kwargs["interpolation"] = "random"
    options = dict(PRESETS[preset])
    lighting = options.pop("lighting", 0.0)
    primary, secondary, final = create_transform(is_training=True, separate=True, **kwargs, **options)
    steps = list(final.transforms)
    if lighting:
        # timm's final stage is [ToTensor, Normalize, (RandomErasing)]: light noise goes on [0, 1] pixels.
        steps.insert(1, PCALighting(lighting))
    return transforms.Compose([*primary.transforms, *secondary.transforms, *steps])


def make_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int,
               multi_label: bool = False) -> Mixup | None:
    """timm's batch-level mixup/cutmix (with label smoothing folded into its soft targets), or None when off.
    `multi_label`: the targets are 0/1 vectors, and two images mixed carry both label sets, weighted."""
    if not (mixup or cutmix):
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes,
                 multi_label=multi_label)


def resize_size(data_config: dict[str, Any]) -> int:
    """Shorter-side size the eval transform resizes to before cropping (for JPEG draft decoding)."""
    size = int(data_config["input_size"][-1])
    return int(size / (data_config.get("crop_pct") or 1.0))
