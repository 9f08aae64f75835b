"""Does the audit find what is wrong? Dirty copies of the shared datasets, precision and recall (issue 14).

For each dataset (default: hymenoptera and clothing from ../shared/data, the shared mobilenetv2_100 weights,
default 224 px), the pretrained features are extracted once (the feature cache), then:

1. the clean original is audited: how many findings of each kind, and the top ones, to look at;
2. label flips (clothing: 5% and 10% of the training labels moved to a random other class, seeded): the
   flagged training images against the flipped ones, precision and recall;
3. planted near-duplicates: 20 training images copied into val as re-encoded (JPEG quality 75), resized
   (0.6x) or slightly cropped (5% a side) versions; recall of the (original, copy) leakage pairs, and the
   false pairs (a copy paired with anything but its original);
4. the audit's time with the features cached against one extraction pass over the same images.

Label flips change only the labels the audit sees (the images and their cached features are the same);
the planted copies are new files whose features are extracted (20 images).

    uv run python -m bench audit                    # hymenoptera and clothing
    uv run python -m bench audit --datasets hymenoptera --flips 0.05
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import DATA, DEFAULT_WEIGHTS
from finetune.config import TrainConfig
from finetune.data.folders import Sample, scan_folder
from finetune.data.images import display_path, load_rgb
from finetune.model.backbone import create_backbone
from finetune.strategy.audit import AuditTable, find_duplicates, find_label_issues, run_audit
from finetune.model.features import FINAL, cached_features
from finetune.strategy.measure import process_runtime
from finetune.workflows.audit import audit_table


def flipped(table: AuditTable, rate: float, seed: int) -> tuple[AuditTable, set[str]]:
    """The table with `rate` of the (valid) training labels moved to a random other class."""
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(table.train & table.valid)
    picked = rng.choice(train, size=max(1, round(rate * len(train))), replace=False)
    labels = table.labels.copy()
    k = len(table.classes)
    labels[picked] = (labels[picked] + rng.integers(1, k, size=len(picked))) % k
    return dataclasses.replace(table, labels=labels), {table.paths[i] for i in picked}


def precision_recall(flagged: set[str], truth: set[str]) -> tuple[float, float]:
    hit = len(flagged & truth)
    return hit / max(1, len(flagged)), hit / max(1, len(truth))


def planted_copies(samples: list[Sample], n: int, workdir: Path, seed: int) -> list[tuple[Sample, Sample]]:
    """(original, copy) pairs: n training images re-encoded, resized or cropped into `workdir`."""
    rng = np.random.default_rng(seed)
    pairs = []
    for k, i in enumerate(rng.choice(len(samples), size=n, replace=False)):
        original = samples[int(i)]
        img = load_rgb(original.path)
        w, h = img.size
        if k % 3 == 1:
            img = img.resize((max(8, int(w * 0.6)), max(8, int(h * 0.6))), Image.BICUBIC)
        elif k % 3 == 2:
            img = img.crop((int(w * 0.05), int(h * 0.05), int(w * 0.95), int(h * 0.95)))
        path = workdir / f"copy_{k:02d}.jpg"
        img.save(path, quality=75)
        pairs.append((original, Sample(str(path), original.label)))
    return pairs


def with_copies(table: AuditTable, cfg: TrainConfig, pairs: list[tuple[Sample, Sample]]) -> AuditTable:
    backbone = create_backbone(cfg.model, cfg.weights, len(table.classes), cfg.image_size, keep_source_head=True)
    copies = [c for _, c in pairs]
    feats = cached_features(backbone, copies, batch_size=cfg.batch_size, rt=process_runtime(cfg))
    x, _ = feats.matrix(FINAL, only_valid=False)
    return AuditTable(table.paths + [display_path(c.path) for c in copies],
                      np.concatenate([table.labels, [c.label for c in copies]]), table.splits + ["val"] * len(copies),
                      np.concatenate([table.x, x]), np.concatenate([table.valid, feats.valid]), table.classes)


def duplicate_recall(table: AuditTable, pairs: list[tuple[Sample, Sample]]) -> tuple[float, int]:
    planted = {(display_path(o.path), display_path(c.path)) for o, c in pairs}
    copies = {c for _, c in planted}
    found, false = set(), 0
    for p in find_duplicates(table)[0]:
        a, b = p.a, p.b
        if (a, b) in planted or (b, a) in planted:
            found.add((a, b) if (a, b) in planted else (b, a))
        elif a in copies or b in copies:
            false += 1
    return len(found) / len(planted), false


def phash_pairs(paths: list[str], max_distance: int) -> dict[tuple[int, int], int]:
    """Pairs (i < j) whose perceptual hashes (imagehash's DCT pHash, 64 bits) differ in at most `max_distance`
    bits, with that distance."""
    import imagehash

    bits = np.stack([imagehash.phash(load_rgb(p)).hash.flatten() for p in paths]).astype(np.uint8)
    pairs = {}
    for start in range(0, len(bits), 256):  # Hamming distances a block of rows at a time
        d = (bits[start:start + 256, None, :] != bits[None, :, :]).sum(axis=2)
        for i, j in zip(*np.nonzero(d <= max_distance)):
            if start + i < j:
                pairs[(int(start + i), int(j))] = int(d[i, j])
    return pairs


def phash_versus_features(table: AuditTable, pairs: list[tuple[Sample, Sample]]) -> None:
    """The planted copies found by a perceptual hash at several Hamming distances, and the other pairs it flags
    (among the clean images: false pairs unless the images really are copies)."""
    index = {p: i for i, p in enumerate(table.paths)}
    planted = {tuple(sorted((index[display_path(o.path)], index[display_path(c.path)]))) for o, c in pairs}
    started = time.perf_counter()
    found = phash_pairs(table.paths, 12)
    seconds = time.perf_counter() - started
    for distance in (4, 8, 12):
        hits = {pair for pair, d in found.items() if d <= distance}
        print(f"  pHash <= {distance:>2} bits: planted copies recall {len(hits & planted) / len(planted):.2f}, "
              f"other pairs flagged {len(hits - planted)} ({seconds:.0f} s to hash {len(table.paths)} images)")


def bench(name: str, flips: list[float], seed: int, phash: bool = False) -> None:
    cfg = TrainConfig(data_dir=str(DATA / name), model="mobilenetv2_100", weights=str(DEFAULT_WEIGHTS),
                      num_workers=None)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels)
    table, timings = audit_table(cfg, splits)
    extraction = sum(v for k, v in timings.items() if k.startswith("features_"))
    started = time.perf_counter()
    clean = run_audit(table, seed=seed)
    audit_s = time.perf_counter() - started
    counts = {"label_issues": len(clean.label_issues), "outliers": len(clean.outliers),
              **{kind: sum(1 for p in clean.duplicates if p.kind == kind)
                 for kind in ("leakage", "conflicting", "redundant")}}
    print(f"\n== {name}: {len(table.paths)} images, {len(table.classes)} classes")
    print(f"clean original: {counts}")
    for issue in clean.label_issues[:5]:
        print(f"  label issue  {issue.path}: given {issue.given}, suggested {issue.suggested} ({issue.score:.3f})")
    for pair in clean.duplicates[:5]:
        print(f"  {pair.kind:<11} {pair.a} ~ {pair.b} ({pair.similarity:.3f})")
    for o in clean.outliers[:3]:
        print(f"  outlier      {o.path} ({o.distance:.3f})")
    ratio = f"{audit_s / extraction:.3f}x" if extraction else "n/a (features were cached: rerun with a cold cache)"
    print(f"audit {audit_s:.1f} s with the features cached; extraction pass {extraction:.1f} s -> {ratio}")
    for rate in flips:
        dirty, truth = flipped(table, rate, seed)
        issues, _ = find_label_issues(dirty, seed=seed)
        p, r = precision_recall({i.path for i in issues}, truth)
        print(f"labels flipped {rate:.0%}: {len(truth)} flipped, {len(issues)} flagged, precision {p:.2f}, recall {r:.2f}")
    with tempfile.TemporaryDirectory(prefix="audit-copies-") as tmp:
        pairs = planted_copies([s for s in splits.train], 20, Path(tmp), seed)
        dirty = with_copies(table, cfg, pairs)
        recall, false = duplicate_recall(dirty, pairs)
        print(f"20 planted near-duplicates across train/val: recall {recall:.2f}, false pairs {false}")
        if phash:
            phash_versus_features(dirty, pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="hymenoptera,clothing")
    parser.add_argument("--flips", default="0.05,0.10", help="label flip rates (of the training images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phash", action="store_true", help="also a perceptual hash (imagehash) on the planted copies")
    args = parser.parse_args(argv)
    for name in args.datasets.split(","):
        bench(name, [float(f) for f in args.flips.split(",") if f], args.seed, args.phash)
    return 0
