"""`finetune demo`: the whole workflow offline, on generated images, in a few minutes on 2 CPU cores.

To get a pretrained backbone without the network, it first pretrains a small timm model on a
generated *source* task (textures) and saves it as a weights file with a sidecar JSON; then it
fine-tunes that file on the *target* task (shapes) through the same `--weights PATH` route a user
takes with their own weights.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from finetune.config import TrainConfig

SOURCE_CLASSES = ("stripes", "checks", "dots", "rings")
TARGET_CLASSES = ("circle", "square", "triangle")


def _background(rng: random.Random, size: int) -> Image.Image:
    base = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 6)):  # clutter
        x, y = rng.randint(0, size), rng.randint(0, size)
        r = rng.randint(1, size // 10)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img


def _texture(name: str, rng: random.Random, size: int) -> Image.Image:
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    color = tuple(rng.randint(0, 255) for _ in range(3))
    step = rng.randint(6, 14)
    if name == "stripes":
        for i in range(-size, 2 * size, step):
            draw.line((i, 0, i + size // 2, size), fill=color, width=step // 3 + 1)
    elif name == "checks":
        for i in range(0, size, step):
            for j in range(0, size, step):
                if (i // step + j // step) % 2 == 0:
                    draw.rectangle((i, j, i + step - 1, j + step - 1), fill=color)
    elif name == "dots":
        for i in range(step // 2, size, step):
            for j in range(step // 2, size, step):
                draw.ellipse((i - 2, j - 2, i + 2, j + 2), fill=color)
    else:  # rings
        c = size // 2 + rng.randint(-8, 8)
        for r in range(step, size, step):
            draw.ellipse((c - r, c - r, c + r, c + r), outline=color, width=2)
    return img


def _shape(name: str, rng: random.Random, size: int) -> Image.Image:
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    color = tuple(rng.randint(0, 255) for _ in range(3))
    r = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif name == "square":
        a = rng.uniform(0, math.pi / 2)
        pts = [(cx + r * math.cos(a + k * math.pi / 2), cy + r * math.sin(a + k * math.pi / 2)) for k in range(4)]
        draw.polygon(pts, fill=color)
    else:
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3))
               for k in range(3)]
        draw.polygon(pts, fill=color)
    return img


def make_image_folder(root: str | Path, kind: str = "shapes", per_class: int = 40, size: int = 96,
                      seed: int = 0) -> Path:
    """Write a class-folder dataset of generated JPEGs (`shapes` or `textures`)."""
    root = Path(root)
    classes, draw = (TARGET_CLASSES, _shape) if kind == "shapes" else (SOURCE_CLASSES, _texture)
    rng = random.Random(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(name, rng, size).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


def demo_configs(workdir: Path, model: str, weights: str | None, epochs: int) -> tuple[TrainConfig | None, TrainConfig]:
    """The pretraining config (None when real weights are given) and the fine-tuning config."""
    common = dict(model=model, batch_size=16, image_size=64, experiment="finetune-demo", num_workers=0)
    pretrain = None
    if weights is None:
        pretrain = TrainConfig(data_dir=str(workdir / "source-textures"), weights="none", epochs=4, lr=3e-3,
                               output=str(workdir / "pretrain"), run_name="demo-pretrain-textures", **common)
        weights = str(workdir / "weights" / f"{model}.demo.safetensors")
    target = TrainConfig(data_dir=str(workdir / "target-shapes"), weights=weights, epochs=epochs, lr=2e-3,
                         output=str(workdir / "finetune"), run_name="demo-finetune-shapes", **common)
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
               "interpolation": dc["interpolation"], "source": "finetune demo: pretrained on generated textures"}
    weights_path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return weights_path
