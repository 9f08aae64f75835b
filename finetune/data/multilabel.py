"""Splitting images that carry several labels: iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011).

A per-class split cannot serve here: an image belongs to several classes at once. Iterative stratification
deals the images out one label at a time, the rarest label first, each image to the part that still wants the
most of that label, so every part gets about its share of every label, rare ones included. On top of it, every
label that the images carry keeps at least one image in the first part (train): a label the model never sees in
training cannot be learned, and its threshold cannot be chosen.

Pure and deterministic: the same parts for the same paths, label sets, fractions and seed, whatever the order.

Also here, as the lowest place every stage can import: the 0/1 matrix of label sets, and the macro mAP that
chooses the epoch (`training.module`), the warm-up's regularisation (`training.multilabel_head`) and that val and
test report (`evaluation.multilabel`): one definition for every number compared with another.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def iterative_parts(items: Sequence[T], label_sets: Sequence[Sequence[int]], fractions: Sequence[float],
                    seed: int, key=str) -> list[list[T]]:
    """`items` dealt into len(fractions) parts of about those fractions of every label.

    Args:
        items: what is split (samples); `key(item)` orders them before the seeded shuffle (order-free result).
        label_sets: the labels of each item (an item without labels is dealt by size alone).
        fractions: the share of each part; they need not sum to 1 (they are normalised).
    """
    total = sum(fractions)
    shares = [f / total for f in fractions]
    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    random.Random(seed).shuffle(order)
    labels = {i: set(label_sets[i]) for i in order}
    counts = Counter(label for i in order for label in labels[i])
    wanted_label = [{label: share * n for label, n in counts.items()} for share in shares]
    wanted_size = [share * len(order) for share in shares]
    parts: list[list[int]] = [[] for _ in shares]
    left = list(order)
    while left:
        remaining = Counter(label for i in left for label in labels[i])
        if remaining:  # the rarest label left (ties: the lowest label), its images dealt now
            label = min(remaining, key=lambda lb: (remaining[lb], lb))
            batch = [i for i in left if label in labels[i]]
        else:  # images without labels: by size alone
            label, batch = None, list(left)
        for i in batch:
            part = max(range(len(shares)), key=lambda p: (
                wanted_label[p][label] if label is not None else 0.0, wanted_size[p], -p))
            parts[part].append(i)
            wanted_size[part] -= 1
            for lb in labels[i]:
                wanted_label[part][lb] -= 1
        taken = set(batch)
        left = [i for i in left if i not in taken]
    return [[items[i] for i in sorted(p, key=lambda i: key(items[i]))] for p in parts]


def label_matrix(label_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """[N, num_classes] 0/1 (int64): row i marks the classes of label set i."""
    y = np.zeros((len(label_sets), num_classes), dtype=np.int64)
    for row, labels in enumerate(label_sets):
        y[row, list(labels)] = 1
    return y


def per_class_ap(probs: np.ndarray, targets: np.ndarray) -> list[float | None]:
    """Each class's average precision; None for a class with no positive image in `targets` (nothing to rank)."""
    import torch
    from torchmetrics.functional.classification import multilabel_average_precision

    t = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    p = torch.from_numpy(np.asarray(probs, dtype=np.float32))
    with warnings.catch_warnings():  # a class without positives: its AP is left out below, not guessed
        warnings.filterwarnings("ignore", "No positive samples found in target")
        ap = multilabel_average_precision(p, t, num_labels=t.shape[1], average="none").tolist()
    return [float(a) if t[:, c].any() else None for c, a in enumerate(ap)]


def macro_map(probs: np.ndarray, targets: np.ndarray) -> float:
    """The mean AP over the classes with a positive image; NaN when none has one. What chooses the epoch
    (`select_map`), the warm-up's regularisation, and what val and test report as `map_macro`."""
    scored = [a for a in per_class_ap(probs, targets) if a is not None]
    return float(np.mean(scored)) if scored else float("nan")


def keep_every_label_in_first(parts: list[list[T]], label_sets_of) -> list[list[T]]:
    """Moves into parts[0] (train), for each label that no image of it carries, the image of another part that
    carries it with the fewest labels (ties: the first in order). Labels that only one image carries end up in
    train that way."""
    parts = [list(p) for p in parts]
    in_first = {lb for item in parts[0] for lb in label_sets_of(item)}
    missing = sorted({lb for p in parts[1:] for item in p for lb in label_sets_of(item)} - in_first)
    for label in missing:
        if label in in_first:
            continue
        candidates = [(len(label_sets_of(item)), j, n, item) for j, p in enumerate(parts[1:], start=1)
                      for n, item in enumerate(p) if label in label_sets_of(item)]
        _, j, n, item = min(candidates, key=lambda c: c[:3])
        parts[j].pop(n)
        parts[0].append(item)
        in_first |= set(label_sets_of(item))
    return parts
