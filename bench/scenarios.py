"""Benchmark of the four-scenario plans: every plan, plus a naive baseline, on each dataset.

For each dataset (the three in ../shared/data by default, or the folders given), the scenario is
decided on the *whole* dataset exactly as `finetune plan` does. Then every plan -- small-similar,
small-different, large-similar, large-different, and a naive baseline (full fine-tune, one learning
rate for all layers, no warm-up) -- trains on the same split with the same --epochs and reports its
validation accuracy and wall time. The network plans get --epochs; the small-* plans train their
linear head for --head-epochs (default 10, their default run) on cached features, which costs
less than one network epoch -- see the time column. Training sets (and validation sets) can be capped with a
stratified subset to fit a CPU budget; the table says when they were.

Features are extracted once per (capped) split before the plans run, so the time of each plan is
its own work with a warm feature cache; the extraction time is a separate column.

    uv run python bench/scenarios.py --epochs 1 --max-train 200 --max-val 200
    uv run python bench/scenarios.py my-images/ --epochs 3

Prints one table and writes it as CSV (default bench/results/scenarios.csv), appending a row per
plan as it finishes, so a long run that is stopped keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune import runtime  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.data.folders import Sample, scan_folder  # noqa: E402
from finetune.data.profile import stratified_subset  # noqa: E402
from finetune.strategy.decide import SCENARIO_NAMES, Plan  # noqa: E402

SHARED = ROOT.parent / "shared"
DEFAULT_WEIGHTS = SHARED / "weights" / "mobilenetv2_100.coral_in1k.safetensors"
PLANS = (*SCENARIO_NAMES, "naive")
# Not a plan: large-similar with --augment none --ema 0, the recipe's own baseline (issue 4).
EXTRA = ("large-similar-plain",)
FIELDS = ["dataset", "n_train", "n_val", "classes", "per_class_median", "grayscale_share", "train_cap", "val_cap",
          "similarity", "probe", "depth", "source_confidence", "bn_match", "best_stage", "auto", "plan",
          "is_auto", "epochs", "val_acc", "time_s", "extract_s"]


# The naive baseline's recipe (TrainConfig options, on top of large-different's): light augmentation, constant LR,
# nothing else.
NAIVE_RECIPE = dict(augment="light", mixup=0.0, cutmix=0.0, label_smoothing=0.0, schedule="constant",
                    warmup_epochs=0.0, dropout=0.0, drop_path=0.0, drop_connect=0.0, ema=0.0)


def naive(plan: Plan, epochs: int) -> Plan:
    """Full fine-tune, one learning rate for every layer, plain BatchNorm, no warm-up, --epochs as given (and, in
    `bench_dataset`, a plain recipe: light augmentation, constant LR, no regularisers)."""
    return dataclasses.replace(plan, scenario="naive", train_on_features=False, head_stage="final",
                               trainable_fraction=1.0, freeze_groups=None, backbone_lr_mult=1.0, layer_decay=1.0,
                               head_warmup_epochs=0, epochs=epochs, bn_policy="train",
                               reasons=["naive baseline: all layers, one LR, no warm-up"])


def link_subset(samples: list[Sample], classes: list[str], root: Path) -> None:
    """A class-folder view of `samples` made of symlinks (file names made unique)."""
    for i, s in enumerate(samples):
        d = root / classes[s.label]
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(s.path), d / f"{i:05d}_{Path(s.path).name}")


def capped_folder(data_dir: Path, max_train: int | None, max_val: int | None, seed: int, workdir: Path):
    """(folder to train on, train cap used, val cap used); the original folder when nothing is capped."""
    splits = scan_folder(data_dir, seed=seed)
    cap_t = max_train if max_train and len(splits.train) > max_train else None
    cap_v = max_val if max_val and len(splits.val) > max_val else None
    if cap_t is None and cap_v is None:  # train() splits the folder the same way (same seed)
        return data_dir, None, None
    root = workdir / data_dir.name
    link_subset(stratified_subset(splits.train, cap_t) if cap_t else splits.train, splits.classes, root / "train")
    link_subset(stratified_subset(splits.val, cap_v) if cap_v else splits.val, splits.classes, root / "val")
    return root, cap_t, cap_v


def bench_dataset(data_dir: Path, args: argparse.Namespace, workdir: Path, writer, out) -> list[dict]:
    from finetune.workflows.plan import plan_folder
    from finetune.model.backbone import create_backbone
    from finetune.strategy.features import cached_features
    from finetune.workflows.train import train

    base = dict(model=args.model, weights=str(args.weights), batch_size=args.batch_size, num_workers=args.num_workers,
                seed=args.seed, experiment="bench-scenarios", image_size=args.image_size)
    decision, _ = plan_folder(TrainConfig(data_dir=str(data_dir), epochs=args.epochs, **base))
    p, s = decision.profile, decision.similarity
    folder, cap_t, cap_v = capped_folder(data_dir, args.max_train, args.max_val, args.seed, workdir)

    splits = scan_folder(folder, seed=args.seed)  # warm the feature cache: each plan's time is its own work
    bb = create_backbone(args.model, str(args.weights), len(splits.classes), args.image_size, keep_source_head=True)
    started = time.perf_counter()
    for part in (splits.train, splits.val):
        cached_features(bb, part, batch_size=args.batch_size, rt=runtime.resolve(workers=args.num_workers))
    extract_s = time.perf_counter() - started

    rows = []
    for name in args.plans:
        epochs = args.head_epochs if name.startswith("small") else args.epochs
        overrides = dict(NAIVE_RECIPE) if name == "naive" else dict(augment="none", ema=0.0) if name in EXTRA else {}
        scenario = {"naive": "large-different", "large-similar-plain": "large-similar"}.get(name, name)
        cfg = TrainConfig(data_dir=str(folder), epochs=epochs, output=str(workdir / "runs" / f"{data_dir.name}-{name}"),
                          run_name=f"bench-{data_dir.name}-{name}", scenario=scenario, **base, **overrides)
        t0 = time.perf_counter()
        summary = train(cfg, plan_override=(lambda plan: naive(plan, args.epochs)) if name == "naive" else None)
        row = {"dataset": data_dir.name, "n_train": p.n_train, "n_val": p.n_val, "classes": p.n_classes,
               "per_class_median": p.per_class_median, "grayscale_share": p.grayscale_share,
               "train_cap": cap_t or "", "val_cap": cap_v or "", "similarity": s.score,
               **{k: s.components.get(k, "") for k in ("probe", "depth", "source_confidence", "bn_match")},
               "best_stage": s.best_stage, "auto": decision.plan.scenario, "plan": name,
               "is_auto": name == decision.plan.scenario, "epochs": summary["plan"]["epochs"],
               "val_acc": round(summary["metrics"]["val_acc"], 4), "time_s": round(time.perf_counter() - t0, 1),
               "extract_s": round(extract_s, 1)}
        writer.writerow(row)
        out.flush()
        print(f"  {data_dir.name:<12} {name:<16} val_acc {row['val_acc']:.4f}  {row['time_s']:>7.1f}s", flush=True)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    by_ds: dict[str, list[dict]] = {}
    for r in rows:
        by_ds.setdefault(r["dataset"], []).append(r)
    head = f"{'dataset':<12} {'train':>6} {'val':>5} {'cls':>4} {'cap':>9} {'sim':>5} {'auto':<16}"
    shown = PLANS + tuple(p for p in EXTRA if any(r["plan"] == p for r in rows))
    head += "".join(f" {p[:15]:>15}" for p in shown) + "  auto-best"
    print("\nval accuracy (time s)\n" + head)
    for ds, rs in by_ds.items():
        r0 = rs[0]
        accs = {r["plan"]: r for r in rs}
        cells = "".join(f" {accs[p]['val_acc']:>7.3f} ({accs[p]['time_s']:>5.0f})" if p in accs else f" {'-':>15}"
                        for p in shown)
        best = max(r["val_acc"] for r in rs if r["plan"] in PLANS)
        auto = accs.get(r0["auto"])
        gap = f"{(auto['val_acc'] - best) * 100:+.1f} pt" if auto else "-"
        cap = f"{r0['train_cap'] or 'all'}/{r0['val_cap'] or 'all'}"
        print(f"{ds:<12} {r0['n_train']:>6} {r0['n_val']:>5} {r0['classes']:>4} {cap:>9} {r0['similarity']:>5.2f} "
              f"{r0['auto']:<16}{cells}  {gap}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="*", type=Path, help="image folders (default: the three in ../shared/data)")
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--head-epochs", type=int, default=10,
                        help="epochs of the small-* plans' linear heads on cached features (no backbone forward)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--max-train", type=int, default=None, help="cap training images per dataset (stratified)")
    parser.add_argument("--max-val", type=int, default=None, help="cap validation images per dataset (stratified)")
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS + EXTRA,
                        help="large-similar-plain: large-similar with --augment none --ema 0 (the recipe's baseline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scenarios.csv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    datasets = args.data or [SHARED / "data" / n for n in ("hymenoptera", "clothing", "omniglot")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-scenarios-") as tmp, args.out.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=FIELDS)
        writer.writeheader()
        for data_dir in datasets:
            if not data_dir.is_dir():
                print(f"skipping {data_dir}: not a folder", file=sys.stderr)
                continue
            rows += bench_dataset(data_dir, args, Path(tmp), writer, out)
    print_table(rows)
    print(f"\nCSV: {args.out}")


if __name__ == "__main__":
    main()
