"""Several labels per image: mosaics of clothing photos, fine-tuned by `finetune train` vs a linear baseline.

    uv run --frozen python -m bench multilabel build --out .bench-data/mosaic        # seconds
    uv run --frozen python -m bench multilabel run --data .bench-data/mosaic/mosaic-600.csv --seeds 0,1,2
    uv run --frozen python -m bench multilabel report .bench-data/mosaic/*.jsonl

`build` makes real multi-label data offline from the shared clothing set: each image is a 2x2 mosaic of 2 to 4
photos of different classes (empty cells grey), labelled with the set of classes it shows, as a label file with a
split column. Train and val mosaics are cut from clothing's train photos, test mosaics from its test photos, so no
photo is in two splits. One label file per set size (--sizes: training mosaics per file).

`run` trains each policy on a label file, per seed, and appends one row per (policy, seed) to a .jsonl beside it:
`auto` (the shipped decision) and every fine-tuning scenario forced (`large-similar`, `large-different`) through
`finetune train`, and the baseline the fine-tuned model must beat: a one-vs-rest logistic regression on the frozen
backbone's pooled features (the head `train` warms up, on a wider C grid: standardised, C chosen by macro mAP on a
fifth of train held out, then refitted on all of train). Every policy reports the test split's macro mAP, read once.

`report` prints per label file the seed-averaged test macro mAP of each policy, its margin over the baseline, and
the regret of each policy against the best of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import DATA, DEFAULT_WEIGHTS, ROOT, append_jsonl

POLICIES = ("auto", "large-similar", "large-different", "linear (frozen features)")
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 1.0, 10.0)


# --- build -----------------------------------------------------------------------------------------

def _photos(split_dir: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(split_dir.iterdir()) if d.is_dir()}


def _mosaic(picked: list[Path], cells: list[int], size: int):
    """A size x size grey canvas with each photo fitted into its cell of the 2x2 grid."""
    from PIL import Image, ImageOps

    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    half = size // 2
    for cell, path in zip(cells, picked):
        with Image.open(path) as img:
            tile = ImageOps.fit(img.convert("RGB"), (half, half))
        canvas.paste(tile, ((cell % 2) * half, (cell // 2) * half))
    return canvas


def build_split(photos: dict[str, list[Path]], n: int, out: Path, prefix: str, size: int,
                rng: random.Random) -> list[dict[str, str]]:
    """`n` mosaics of 2-4 photos of distinct classes in random cells (each photo used once while the class has
    photos left), and their rows."""
    pools = {c: rng.sample(p, len(p)) for c, p in photos.items()}
    rows = []
    for i in range(n):
        k = rng.randint(2, 4)
        classes = rng.sample(sorted(photos), k)
        picked = [pools[c].pop() if pools[c] else rng.choice(photos[c]) for c in classes]
        name = f"{prefix}_{i:05d}.jpg"
        _mosaic(picked, rng.sample(range(4), k), size).save(out / name, quality=90)
        rows.append({"path": f"images/{name}", "labels": ";".join(sorted(classes))})
    return rows


def build(args: argparse.Namespace) -> int:
    import csv

    source = args.source
    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    train_photos, test_photos = _photos(source / "train"), _photos(source / "test")
    for n in args.sizes:
        rng = random.Random(args.seed + n)
        n_val, n_test = max(50, n // 4), max(100, n // 3)
        rows = ([dict(r, split="train") for r in build_split(train_photos, n, out / "images", f"s{n}-train",
                                                             args.size, rng)]
                + [dict(r, split="val") for r in build_split(train_photos, n_val, out / "images", f"s{n}-val",
                                                             args.size, rng)]
                + [dict(r, split="test") for r in build_split(test_photos, n_test, out / "images", f"s{n}-test",
                                                              args.size, rng)])
        path = out / f"mosaic-{n}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "labels", "split"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"{path}: {n} train, {n_val} val, {n_test} test mosaics of {len(train_photos)} classes")
    return 0


# --- run -------------------------------------------------------------------------------------------

def train_policy(data: Path, policy: str, args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    from finetune.config import TrainConfig
    from finetune.workflows.train import train

    cfg = TrainConfig(data_dir=str(data), model=args.model, weights=str(args.weights), epochs=args.epochs,
                      image_size=args.image_size, batch_size=args.batch_size, seed=seed,
                      scenario="auto" if policy == "auto" else policy, output=str(out), experiment="bench-multilabel")
    summary = train(cfg)
    m = summary["metrics"]
    return {"test_map_macro": m["test_map_macro"], "test_f1_micro": m["test_f1_micro"],
            "test_subset_accuracy": m["test_subset_accuracy"], "select_map": m["select_map"],
            "scenario": summary["scenario"], "timing": summary.get("timing")}


def linear_baseline(data: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One-vs-rest logistic regression on the frozen backbone's pooled features (the product's feature cache): the
    head `finetune train` warms up (`training/multilabel_head.py`), on a wider C grid, and no fine-tuning."""
    import numpy as np

    from finetune.data.folders import scan_folder
    from finetune.data.multilabel import label_matrix, macro_map
    from finetune.model.backbone import create_backbone
    from finetune.model.features import FINAL, cached_features
    from finetune.training.multilabel_head import fit_multilabel_head

    splits = scan_folder(data, seed=seed, multi_label=True)
    backbone = create_backbone(args.model, str(args.weights), len(splits.classes), args.image_size)

    def xy(samples):
        feats = cached_features(backbone, samples, batch_size=args.batch_size)
        x, _ = feats.matrix(FINAL)
        return x, label_matrix([s.labels for s, ok in zip(samples, feats.valid) if ok], len(splits.classes))

    train_x, train_y = xy(splits.train)
    test_x, test_y = xy(splits.test)
    head = fit_multilabel_head(train_x, train_y, seed, C_GRID)
    probs = 1 / (1 + np.exp(-(test_x @ head.weight.numpy().T + head.bias.numpy())))
    return {"test_map_macro": macro_map(probs, test_y), "C": head.c, "select_map": head.held_out_map}


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / '.bench-data' / 'mlflow-bench.db'}")
    rows_path = args.out or args.data.with_suffix(".jsonl")
    for seed in args.seeds:
        for policy in args.policies:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="bench-multilabel-") as tmp:
                result = (linear_baseline(args.data, args, seed) if policy == POLICIES[-1]
                          else train_policy(args.data, policy, args, seed, Path(tmp) / "run"))
            row = {"data": args.data.name, "model": args.model, "policy": policy, "seed": seed,
                   "seconds": round(time.perf_counter() - started, 1), **result}
            append_jsonl(rows_path, row)
            print(f"{args.data.name} seed {seed} {policy:<26} test mAP {row['test_map_macro']:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)
    return 0


# --- report ----------------------------------------------------------------------------------------

def report_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Per label file: each policy's seed-averaged test mAP, its margin over the linear baseline, its regret."""
    lines = []
    by_data: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_data[r["data"]][r["policy"]].append(r["test_map_macro"])
    for data, policies in by_data.items():
        means = {p: statistics.mean(v) for p, v in policies.items()}
        best = max(means.values())
        base = means.get(POLICIES[-1])
        lines += [f"### {data}", "", "| policy | seeds | test macro mAP | vs linear (pt) | regret (pt) |",
                  "|---|---|---|---|---|"]
        for p, v in policies.items():
            margin = f"{100 * (means[p] - base):+.2f}" if base is not None else "n/a"
            lines.append(f"| {p} | {len(v)} | {means[p]:.4f} | {margin} | {100 * (best - means[p]):.2f} |")
        lines.append("")
    return lines


def report(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
    print("\n".join(report_rows(rows)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="mosaic label files from the shared clothing set")
    b.add_argument("--source", type=Path, default=DATA / "clothing")
    b.add_argument("--out", type=Path, default=ROOT / ".bench-data" / "mosaic")
    b.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[300, 1200])
    b.add_argument("--size", type=int, default=256, help="mosaic side in pixels")
    b.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="train every policy on one label file, per seed")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--out", type=Path, default=None, help="rows file (default: the label file's .jsonl)")
    r.add_argument("--model", default="mobilenetv2_100")
    r.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--image-size", type=int, default=160)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    r.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    p = sub.add_parser("report", help="seed-averaged test mAP per policy")
    p.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    return {"build": build, "run": run, "report": report}[args.command](args)
