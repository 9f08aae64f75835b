"""The dataset profile: how much data, how it is spread over classes, what the images look like.

Built from what `data.scan_folder` already learned while validating every file (size and mode of
each image), so profiling costs no second pass over the images. Pure Python: no torch.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from finetune.data.folders import FolderSplits, Sample

# Pillow modes without colour. A palette ("P") image may or may not hold colour; it counts as colour.
GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class DatasetProfile:
    """Counts and shapes of an image-folder dataset (train split unless said otherwise)."""

    n_train: int
    n_val: int
    n_test: int
    n_classes: int
    per_class_min: int
    per_class_median: float
    per_class_max: int
    imbalance_ratio: float  # largest class / smallest class, train split
    grayscale_share: float  # share of train images stored without colour
    median_width: int
    median_height: int
    n_skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_splits(splits: FolderSplits) -> DatasetProfile:
    """Profile a scanned folder from the image info gathered during the scan. A class's count: the training
    images that show it (multi-label images count for each of their classes)."""
    per_class = Counter(label for s in splits.train for label in (s.labels or (s.label,)))
    counts = [per_class.get(i, 0) for i in range(len(splits.classes))]
    infos = [s.info for s in splits.train if s.info is not None]
    gray = sum(1 for i in infos if i.mode in GRAYSCALE_MODES)
    return DatasetProfile(
        n_train=len(splits.train),
        n_val=len(splits.val),
        n_test=len(splits.test),
        n_classes=len(splits.classes),
        per_class_min=min(counts),
        per_class_median=float(statistics.median(counts)),
        per_class_max=max(counts),
        imbalance_ratio=round(max(counts) / max(1, min(counts)), 3),
        grayscale_share=round(gray / len(infos), 4) if infos else 0.0,
        median_width=int(statistics.median(i.width for i in infos)) if infos else 0,
        median_height=int(statistics.median(i.height for i in infos)) if infos else 0,
        n_skipped=len(splits.skipped),
    )


def stratified_indices(labels: Sequence[int], limit: int) -> list[int]:
    """Indices of at most `limit` items, the same share of each class, deterministic (every k-th item of a
    class), grouped by class."""
    if len(labels) <= limit:
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    keep: list[int] = []
    for label in sorted(by_class):
        items = by_class[label]
        n = max(1, round(len(items) * limit / len(labels)))
        step = len(items) / n
        keep.extend(items[int(i * step)] for i in range(n))
    return keep


def stratified_subset(samples: list[Sample], limit: int) -> list[Sample]:
    """At most `limit` samples, the same share of each class, deterministic (every k-th file)."""
    return [samples[i] for i in stratified_indices([s.label for s in samples], limit)]
