"""`finetune demo`: the whole workflow offline, on generated images, in a few minutes on 2 CPU cores.

To get a pretrained backbone without the network, it first pretrains a small timm model on a
generated *source* task (six filled shapes on plain backgrounds) and saves it as a weights file
with a sidecar JSON; then it fine-tunes that file on the *target* task (three of the shapes drawn
as outlines on cluttered backgrounds, 40 images each) through the same `--weights PATH` route a
user takes with their own weights.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from finetune.config import TrainConfig

# The source task (stands in for ImageNet) teaches shape: six filled shapes. The target task asks for
# three of them drawn as outlines, a related but not identical domain, with little data.
SOURCE_CLASSES = ("circle", "square", "triangle", "star", "cross", "hexagon")
TARGET_CLASSES = ("circle", "square", "triangle")


def _background(rng: random.Random, size: int, clutter: int) -> Image.Image:
    base = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, clutter)):
        x, y = rng.randint(0, size), rng.randint(0, size)
        r = rng.randint(1, size // 10)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img


def _polygon(cx: float, cy: float, r: float, corners: int, angle: float, inner: float = 1.0) -> list[tuple[float, float]]:
    """Corners of a regular polygon (or, with inner < 1, a star: every other corner pulled inwards)."""
    n = corners * (2 if inner < 1.0 else 1)
    radii = [r * (inner if k % 2 else 1.0) for k in range(n)]  # inner == 1: every corner at r
    return [(cx + rk * math.cos(angle + 2 * math.pi * k / n), cy + rk * math.sin(angle + 2 * math.pi * k / n))
            for k, rk in enumerate(radii)]


def _shape(name: str, rng: random.Random, size: int, filled: bool = True) -> Image.Image:
    img = _background(rng, size, clutter=0 if filled else 6)  # the target also has clutter
    draw = ImageDraw.Draw(img)
    color = tuple(rng.randint(0, 255) for _ in range(3))
    r = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    a = rng.uniform(0, 2 * math.pi)
    if name == "circle":
        pts = _polygon(cx, cy, r, 48, a)
    elif name == "square":
        pts = _polygon(cx, cy, r, 4, a)
    elif name == "triangle":
        pts = _polygon(cx, cy, r, 3, a)
    elif name == "star":
        pts = _polygon(cx, cy, r, 5, a, inner=0.45)
    elif name == "hexagon":
        pts = _polygon(cx, cy, r, 6, a)
    else:  # cross: a plus sign of two bars
        w = r / 3
        pts = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
               (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
               (cx - r, cy - w), (cx - w, cy - w)]
        c, s = math.cos(a), math.sin(a)
        pts = [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]
    if filled:
        draw.polygon(pts, fill=color)
    else:
        draw.polygon(pts, outline=color, width=max(2, size // 24))
    return img


def make_image_folder(root: str | Path, kind: str = "outlines", per_class: int = 40, size: int = 96,
                      seed: int = 0) -> Path:
    """Write a class-folder dataset of generated JPEGs: `shapes` (the six filled source shapes) or
    `outlines` (the three target shapes, outlined)."""
    root = Path(root)
    classes, filled = (SOURCE_CLASSES, True) if kind == "shapes" else (TARGET_CLASSES, False)
    rng = random.Random(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _shape(name, rng, size, filled).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


# Pretraining from random init with a plain recipe: the regularisers of the default from-scratch
# plan (strong augmentation, mixup, cutmix, EMA) pay off over long schedules; in a few hundred
# steps they kept the source model at chance (0.33 on 4 classes).
PLAIN_RECIPE = dict(augment="light", mixup=0.0, cutmix=0.0, label_smoothing=0.0, dropout=0.0, drop_path=0.0,
                    ema=0.0, warmup_epochs=0.0)


def demo_configs(workdir: Path, model: str, weights: str | None, epochs: int,
                 pretrain_epochs: int = 10) -> tuple[TrainConfig | None, TrainConfig]:
    """The pretraining config (None when real weights are given) and the fine-tuning config."""
    common = dict(model=model, batch_size=16, image_size=64, experiment="finetune-demo", num_workers=0)
    pretrain = None
    if weights is None:
        pretrain = TrainConfig(data_dir=str(workdir / "source-shapes"), weights="none", epochs=pretrain_epochs,
                               lr=3e-3, output=str(workdir / "pretrain"), run_name="demo-pretrain-shapes",
                               **common, **PLAIN_RECIPE)
        weights = str(workdir / "weights" / f"{model}.demo.safetensors")
    target = TrainConfig(data_dir=str(workdir / "target-outlines"), weights=weights, epochs=epochs, lr=2e-3,
                         output=str(workdir / "finetune"), run_name="demo-finetune-outlines", **common)
    return pretrain, target


def export_weights(model_dir: Path, weights_path: Path) -> Path:
    """Turn a trained model folder into a weights file + sidecar, like ../shared/weights has."""
    spec = json.loads((model_dir / "model.json").read_text())
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / "model.safetensors", weights_path)
    dc = spec["data_config"]
    sidecar = {"architecture": spec["architecture"], "create_kwargs": spec.get("create_kwargs", {}),
               "num_classes": spec["num_classes"], "label_names": spec["class_names"],
               "mean": dc["mean"], "std": dc["std"], "input_size": dc["input_size"], "crop_pct": dc["crop_pct"],
               "interpolation": dc["interpolation"], "source": "finetune demo: pretrained on generated filled shapes"}
    weights_path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return weights_path
