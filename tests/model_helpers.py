"""A logged pyfunc model without training: a random timm test net saved and logged like train does."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from finetune.tracking import registry
from finetune import tracking
from finetune.model.artifact import ModelSpec, save_model
from tests.conftest import TINY_MODEL

DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.875,
               "interpolation": "bilinear", "crop_mode": "center"}


def logged_model(tmp_path: Path, classes=("cat", "dog"), default_tta: str = "center", seed: int = 0,
                 max_image_pixels: int | None = None) -> str:
    """Log a randomly initialised TINY_MODEL as a pyfunc model in a fresh run; returns its model URI."""
    torch.manual_seed(seed)
    net = timm.create_model(TINY_MODEL, pretrained=False, num_classes=len(classes))
    spec = ModelSpec(architecture=TINY_MODEL, num_classes=len(classes), class_names=list(classes),
                     data_config=DATA_CONFIG, default_tta=default_tta)
    model_dir = save_model(tmp_path / f"model-{seed}", net, spec)
    run = tracking.client().create_run(tracking.ensure_experiment("test"))
    return registry.log_pyfunc(run.info.run_id, model_dir, list(classes), default_tta, {"frozen": []},
                               max_image_pixels)
