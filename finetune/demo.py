"""`finetune demo`: what transfer learning buys, offline, on generated images, in minutes on 2 CPU cores.

To get a pretrained backbone without the network, it first pretrains a small timm model on a
generated *source* task (six dark shapes on light backgrounds: filled or outlined on plain ones,
filled on stripes; 150 images each: stands in for ImageNet) and saves it as a weights file with a sidecar JSON. Then it trains the same
small *target* task twice with `finetune train`'s own code, same data, epochs and recipe:

* fine-tuned: `--weights FILE` (the route a user takes with their own weights), scenario `auto`, so the
  measured plan decides how (with this little data: a linear head on the frozen features);
* from scratch: `--weights none`, the same network from random init, every layer learning.

The target is related to the source but not a subset of it: three of the shapes, smaller, as thin
outlines on striped backgrounds with clutter (a combination the source never shows), and only 24
training images per class.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

from finetune.config import TrainConfig

SOURCE_CLASSES = ("circle", "square", "triangle", "star", "cross", "diamond")
TARGET_CLASSES = ("circle", "square", "triangle")
SOURCE_PER_CLASS = 150  # 900 images, 720 of them for training
TARGET_TRAIN_PER_CLASS = 24  # little data: 72 training images
TARGET_VAL_PER_CLASS = 60  # 180 validation images
IMAGE_SIZE = 64  # training resolution (the images are drawn at 96 px and resized by the data pipeline)
DRAW_SIZE = 96
TILT = math.radians(15)  # shapes stand upright, tilted by at most this (a diamond is not a square)

Color = tuple[int, int, int]


def _color(rng: random.Random) -> Color:
    return tuple(rng.randint(0, 255) for _ in range(3))


def _luma(c: Color) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _color_in(rng: random.Random, lo: float, hi: float) -> Color:
    """A random colour whose brightness (luma, 0..255) lies in [lo, hi]."""
    while True:
        c = _color(rng)
        if lo <= _luma(c) <= hi:
            return c


def _polygon(cx: float, cy: float, r: float, corners: int, angle: float, inner: float = 1.0) -> list[tuple[float, float]]:
    """Corners of a regular polygon (or, with inner < 1, a star: every other corner pulled inwards)."""
    n = corners * (2 if inner < 1.0 else 1)
    radii = [r * (inner if k % 2 else 1.0) for k in range(n)]  # inner == 1: every corner at r
    return [(cx + rk * math.cos(angle + 2 * math.pi * k / n), cy + rk * math.sin(angle + 2 * math.pi * k / n))
            for k, rk in enumerate(radii)]


def _outline_points(name: str, cx: float, cy: float, r: float, a: float) -> list[tuple[float, float]]:
    if name == "circle":
        return _polygon(cx, cy, r, 48, a)
    if name == "square":  # upright at a == 0
        return _polygon(cx, cy, r, 4, a + math.pi / 4)
    if name == "triangle":  # pointing up at a == 0
        return _polygon(cx, cy, r, 3, a - math.pi / 2)
    if name == "star":
        return _polygon(cx, cy, r, 5, a - math.pi / 2, inner=0.45)
    if name == "diamond":  # a square standing on a corner, stretched upright
        return [(cx + x * 0.7 * math.cos(a) - y * math.sin(a), cy + x * 0.7 * math.sin(a) + y * math.cos(a))
                for x, y in ((0, -r), (r, 0), (0, r), (-r, 0))]
    if name != "cross":
        raise ValueError(f"unknown shape {name!r}")
    w = r / 3  # a plus sign of two bars, rotated by a
    pts = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
           (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
           (cx - r, cy - w), (cx - w, cy - w)]
    c, s = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, count: int) -> None:
    """Small distractors: dots and short strokes in random colours."""
    for _ in range(count):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        if rng.random() < 0.5:
            r = rng.uniform(1, size / 14)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_color(rng))
        else:
            length, a = rng.uniform(size / 12, size / 6), rng.uniform(0, math.pi)
            draw.line((x, y, x + length * math.cos(a), y + length * math.sin(a)), fill=_color(rng),
                      width=max(1, size // 48))


def _stripes(draw: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    """Parallel light stripes in a random direction, period and tint across the whole image."""
    stripe = _color_in(rng, 130, 255)
    period, a = rng.uniform(size / 8, size / 4), rng.uniform(0, math.pi)
    dx, dy = math.cos(a), math.sin(a)
    for k in range(-8, 9):
        ox, oy = size / 2 - dy * k * period, size / 2 + dx * k * period
        draw.line((ox - dx * size, oy - dy * size, ox + dx * size, oy + dy * size), fill=stripe,
                  width=max(1, round(period / 3)))


def source_image(name: str, rng: random.Random, size: int = DRAW_SIZE) -> Image.Image:
    """Source domain: a large dark shape on a light background (ink on paper, in random tints).

    Half the images have a plain background, with the shape filled or outlined; the other half a
    striped one, with the shape always filled. Outlines on stripes never occur: that combination is
    the target's. (Measured: with random colours both ways instead of dark on light, a randomly
    initialised network barely learned the shapes in the demo's few hundred steps.)
    """
    bg = _color_in(rng, 170, 255)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    striped = rng.random() < 0.5
    if striped:
        _stripes(draw, rng, size)
    _clutter(draw, rng, size, rng.choice((0, 0, 1, 2)))
    r = rng.uniform(0.25, 0.45) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    pts = _outline_points(name, cx, cy, r, rng.uniform(-TILT, TILT))
    color = _color_in(rng, 0, 90)
    if striped or rng.random() < 0.5:
        draw.polygon(pts, fill=color)
    else:
        draw.polygon(pts, outline=color, width=max(2, round(size * rng.uniform(0.04, 0.08))))
    return img


def target_image(name: str, rng: random.Random, size: int = DRAW_SIZE) -> Image.Image:
    """Target domain: a smaller, thinner dark outline on a light striped background with more clutter."""
    img = Image.new("RGB", (size, size), _color_in(rng, 150, 255))
    draw = ImageDraw.Draw(img)
    _stripes(draw, rng, size)
    _clutter(draw, rng, size, rng.randint(3, 7))
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    draw.polygon(_outline_points(name, cx, cy, r, rng.uniform(-TILT, TILT)), outline=_color_in(rng, 0, 90),
                 width=max(2, round(size * 0.035)))
    return img


def make_image_folder(root: str | Path, kind: str, per_class: int, seed: int = 0) -> Path:
    """Write a class-folder dataset of generated JPEGs: `source` images (six shapes) or `target` images
    (three of them in the target's look). The same (kind, seed) always gives the same images."""
    if kind not in ("source", "target"):
        raise ValueError(f"kind must be 'source' or 'target', not {kind!r}")
    root = Path(root)
    classes, draw = (SOURCE_CLASSES, source_image) if kind == "source" else (TARGET_CLASSES, target_image)
    rng = random.Random(f"{kind}-{seed}")  # str seeds are hashed deterministically (sha512)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(name, rng).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


def make_tasks(workdir: Path, seed: int = 0, source: bool = True) -> None:
    """The demo's data: WORKDIR/source (one folder per class) and WORKDIR/target/{train,val}.

    The target's training split is small (the point of the demo) and its validation split large, so
    the two runs' accuracies are measured on 180 images rather than on a fifth of 72.
    """
    if source:
        make_image_folder(workdir / "source", "source", SOURCE_PER_CLASS, seed)
    make_image_folder(workdir / "target" / "train", "target", TARGET_TRAIN_PER_CLASS, seed)
    make_image_folder(workdir / "target" / "val", "target", TARGET_VAL_PER_CLASS, 10_000 + seed)  # other images


# The recipe of the networks that train (pretraining, from scratch): the plain one. The regularisers of the
# default from-scratch recipe (stronger augmentation, label smoothing, stochastic depth, EMA) pay off over
# long schedules; in a few hundred steps they only slow a randomly initialised network down, so the plain
# recipe is the from-scratch run's best chance, not a handicap. The fine-tuned run's measured plan is a
# feature plan (little data: a linear head on frozen, cached features), which refuses these options:
# none of them acts on it, and its own recipe (no label smoothing) is the plain one already.
PLAIN_RECIPE = dict(augment="light", mixup=0.0, cutmix=0.0, label_smoothing=0.0, dropout=0.0, drop_path=0.0,
                    ema=0.0, warmup_epochs=0.0)


def demo_configs(workdir: Path, model: str, weights: str | None, epochs: int, pretrain_epochs: int,
                 seed: int = 0, stamp: str | None = None) -> tuple[TrainConfig | None, TrainConfig, TrainConfig]:
    """(pretraining config or None when weights are given, fine-tuning config, from-scratch config).

    The two target configs differ only in `weights` (and where they write): same data, split, seed,
    epochs, learning rate, batch size and resolution; the from-scratch run (a network that trains) sets the
    plain recipe, which the fine-tuned run's feature plan has already and would refuse as options. Each demo
    writes its runs under `workdir/runs/<stamp>/` (default: the time), so a second demo never reuses the
    first one's run folders.
    """
    runs = workdir / "runs" / (stamp or time.strftime("%Y%m%d-%H%M%S"))
    common = dict(model=model, batch_size=16, image_size=IMAGE_SIZE, experiment="finetune-demo", seed=seed)
    pretrain = None
    if weights is None:
        pretrain = TrainConfig(data_dir=str(workdir / "source"), weights="none", epochs=pretrain_epochs,
                               lr=3e-3, output=str(runs / "pretrain"), run_name="demo-pretrain-source",
                               **common, **PLAIN_RECIPE)
        weights = str(workdir / "weights" / f"{model}.demo.safetensors")
    finetuned = TrainConfig(data_dir=str(workdir / "target"), weights=weights, epochs=epochs, lr=3e-3,
                            output=str(runs / "finetuned"), run_name="demo-target-finetuned", **common)
    scratch = replace(finetuned, weights="none", output=str(runs / "scratch"), run_name="demo-target-scratch",
                      **PLAIN_RECIPE)
    return pretrain, finetuned, scratch


def export_weights(model_dir: Path, weights_path: Path) -> Path:
    """Turn a trained model folder into a weights file + sidecar, like ../shared/weights has."""
    spec = json.loads((model_dir / "model.json").read_text())
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / "model.safetensors", weights_path)
    dc = spec["data_config"]
    sidecar = {"architecture": spec["architecture"], "create_kwargs": spec.get("create_kwargs", {}),
               "num_classes": spec["num_classes"], "label_names": spec["class_names"],
               "mean": dc["mean"], "std": dc["std"], "input_size": dc["input_size"], "crop_pct": dc["crop_pct"],
               "interpolation": dc["interpolation"],
               "source": "finetune demo: pretrained on generated shapes (dark on light, plain or striped)"}
    weights_path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return weights_path


def plan_text(summary: dict[str, Any]) -> str:
    """The plan a run executed, in a few words (scenario: what learned, for how long)."""
    plan = summary["plan"]
    if plan["train_on_features"]:
        stage = "final features" if plan["head_stage"] == "final" else f"{plan['head_stage']} features"
        how = f"linear head on frozen {stage}"
    else:
        frac = plan["trainable_fraction"]
        how = ("all layers" if frac >= 1 else f"top {frac:.0%} of the layers") + " learn"
        if plan["head_warmup_epochs"]:
            how = f"head warm-up, then {how}"
    return f"{summary['scenario']}: {how}, {plan['epochs']} epochs"


def weights_source(summary: dict[str, Any]) -> str:
    """What the run's network started from, as the saved model records it ("none", "file:<path>", ...)."""
    return json.loads((Path(summary["model_dir"]) / "model.json").read_text())["weights_source"]


def _weights_label(summary: dict[str, Any]) -> str:
    source = weights_source(summary)
    if source == "none":
        return "none (random init)"
    return f"file:{Path(source.removeprefix('file:')).name}" if source.startswith("file:") else source


def comparison_table(rows: list[tuple[str, dict[str, Any], float]]) -> str:
    """The side-by-side: one line per (run name, train summary, wall seconds of the whole run)."""
    header = ("run", "weights", "scenario: plan (auto)", "val acc", "wall time")
    lines = [(name, _weights_label(s), plan_text(s), f"{s['metrics']['val_acc']:.2f}", f"{seconds:.0f} s")
             for name, s, seconds in rows]
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i >= 3 else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in lines)])


def run_demo(root: Path, model: str, weights: str | None, epochs: int, pretrain_epochs: int, seed: int,
             say: Callable[[str], None]) -> None:
    """`finetune demo`: pretrain on the source task (unless `weights` is given), then train the target task
    fine-tuned and from scratch; `say` prints each step and the side-by-side table."""
    from finetune.workflows.train import train

    def run_train(cfg: TrainConfig) -> tuple[dict[str, Any], float]:  # the summary and the wall time, MLflow included
        started = time.monotonic()
        return train(cfg), time.monotonic() - started

    started = time.monotonic()
    pretrain, finetuned, scratch = demo_configs(root, model, weights, epochs, pretrain_epochs, seed)
    make_tasks(root, seed, source=pretrain is not None)
    if pretrain is not None:
        say(f"[1/3] Pretraining {model} from random init on generated shapes (stands in for ImageNet)...")
        summary, seconds = run_train(pretrain)
        export_weights(Path(summary["model_dir"]), Path(finetuned.weights))
        say(f"      source val_acc {summary['metrics']['val_acc']:.2f} after {seconds:.0f} s; saved the weights "
            f"to {finetuned.weights} (+ sidecar .json)")
    say(f"[2/3] Target task, fine-tuned: finetune train {finetuned.data_dir} --weights {finetuned.weights} ...")
    tuned, tuned_s = run_train(finetuned)
    say("[3/3] Target task, from scratch: the same run with --weights none ...")
    fresh, fresh_s = run_train(scratch)
    say(f"\nTarget task: {len(TARGET_CLASSES)} classes ({', '.join(TARGET_CLASSES)}), chance "
        f"{1 / len(TARGET_CLASSES):.2f}; {tuned['data']['train']} training and {tuned['data']['val']} validation "
        "images, the same for both runs")
    say(comparison_table([("fine-tuned", tuned, tuned_s), ("from scratch", fresh, fresh_s)]))
    say(f"(demo total {time.monotonic() - started:.0f} s, pretraining and data generation included)")
    say(f"\nsummaries:  {tuned['output']}/summary.json, {fresh['output']}/summary.json")
    say(f"MLflow:     mlflow ui --backend-store-uri {tuned['mlflow_tracking_uri']}  (experiment "
        f"{tuned['experiment']!r})")
