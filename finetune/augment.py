"""Named augmentation presets, built with timm's `create_transform`.

The eval transform (resize + centre crop from the model's data config) is the single preprocessing
for validation, TTA, feature extraction and serving; training presets add augmentation on top.
"""

from __future__ import annotations

from typing import Any, Callable

from timm.data import create_transform

from finetune.errors import UserError

PRESETS: dict[str, dict[str, Any]] = {
    # No augmentation: exactly the eval preprocessing.
    "none": {},
    # Gentle crops and flips: keeps objects recognisable for small datasets.
    "light": dict(scale=(0.5, 1.0), hflip=0.5, color_jitter=None),
    # + colour jitter: invariance to lighting and white balance.
    "standard": dict(scale=(0.25, 1.0), hflip=0.5, color_jitter=0.3),
    # + RandAugment and random erasing: for larger datasets and long schedules.
    "strong": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                   re_prob=0.25, re_mode="pixel"),
}


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
    return create_transform(is_training=True, **kwargs, **PRESETS[preset])


def resize_size(data_config: dict[str, Any]) -> int:
    """Shorter-side size the eval transform resizes to before cropping (for JPEG draft decoding)."""
    size = int(data_config["input_size"][-1])
    return int(size / (data_config.get("crop_pct") or 1.0))
