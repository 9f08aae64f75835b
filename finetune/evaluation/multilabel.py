"""Multi-label scores: per-class decision thresholds, chosen on the selection split, and the metrics reported.

A multi-label model gives each class its own probability; the answer is the set of classes above their
thresholds. One threshold of 0.5 for every class is rarely right (a rare class's probabilities stay low), so each
class gets its own, chosen on held-out training images (the selection split), never on val or test:

* `f1` (default): the threshold with the best F1 of that class on the selection images;
* a target precision: the lowest threshold whose precision reaches it (the most recall at that precision).

The metrics: average precision (mAP) per class, macro (the mean over classes) and micro (every decision pooled),
which need no threshold; and at the chosen thresholds, precision, recall and F1 per class and pooled, and the
subset accuracy (the share of images whose whole label set is right).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import precision_recall_curve
from torchmetrics.functional.classification import multilabel_average_precision

DEFAULT_THRESHOLD = 0.5  # a class with no positive (or no negative) selection image: nothing to choose on


@dataclass(frozen=True)
class Thresholds:
    values: list[float]  # one per class, in class order: a class is in the answer when its probability >= it
    chosen_by: list[str]  # per class: "f1", "precision", or why the default stands

    def to_dict(self) -> dict[str, Any]:
        return {"values": [round(v, 6) for v in self.values], "chosen_by": self.chosen_by}


def choose_thresholds(probs: np.ndarray, targets: np.ndarray, target_precision: float | None = None) -> Thresholds:
    """Per-class thresholds on held-out images: `probs` (N, C) in [0, 1], `targets` (N, C) of 0/1.

    A threshold falls halfway between the lowest probability it takes in and the highest it leaves out, so a
    probability a little off the selection images' decides as theirs did.
    """
    values, chosen_by = [], []
    for c in range(probs.shape[1]):
        value, why = _class_threshold(probs[:, c], targets[:, c].astype(bool), target_precision)
        values.append(value)
        chosen_by.append(why)
    return Thresholds(values, chosen_by)


def _class_threshold(p: np.ndarray, positive: np.ndarray, target_precision: float | None) -> tuple[float, str]:
    if positive.all() or not positive.any():
        return DEFAULT_THRESHOLD, "default: the selection images are all " + ("positive" if positive.any() else
                                                                              "negative")
    precision, recall, cuts = precision_recall_curve(positive, p)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    if target_precision is None:
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        i, why = int(np.argmax(f1)), "f1"  # the first best: the lowest threshold, the most recall
    else:
        reached = np.flatnonzero(precision >= target_precision)
        i, why = ((int(reached[0]), "precision") if reached.size else
                  (len(cuts) - 1, f"precision: {target_precision:g} not reached, the highest threshold"))
    below = p[p < cuts[i]]
    return float((cuts[i] + below.max()) / 2 if below.size else cuts[i]), why


def predict_sets(probs: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """(N, C) booleans: each image's classes at the thresholds."""
    return probs >= np.asarray(thresholds.values)[None, :]


def metrics(probs: np.ndarray, targets: np.ndarray, thresholds: Thresholds, classes: list[str]) -> dict[str, Any]:
    """mAP (macro, micro, per class), and at the thresholds precision/recall/F1 (per class, macro, micro) and the
    subset accuracy. A class with no positive image in `targets` has no AP (None) and is left out of the macro."""
    t = torch.from_numpy(targets.astype(np.int64))
    p = torch.from_numpy(probs.astype(np.float32))
    has_positive = targets.sum(0) > 0
    with warnings.catch_warnings():  # a class without positives: its AP is left out below, not guessed
        warnings.filterwarnings("ignore", "No positive samples found in target")
        per_class_ap = multilabel_average_precision(p, t, num_labels=len(classes), average="none").tolist()
    ap = [float(a) if has_positive[c] else None for c, a in enumerate(per_class_ap)]
    predicted = predict_sets(probs, thresholds)
    truth = targets.astype(bool)
    tp = (predicted & truth).sum(0)
    fp = (predicted & ~truth).sum(0)
    fn = (~predicted & truth).sum(0)
    prec, rec, f1 = _prf(tp, fp, fn)
    micro = _prf(np.array([tp.sum()]), np.array([fp.sum()]), np.array([fn.sum()]))
    scored = [a for a in ap if a is not None]
    return {
        "map_macro": float(np.mean(scored)) if scored else None,
        "map_micro": float(multilabel_average_precision(p, t, num_labels=len(classes), average="micro")),
        "precision_micro": float(micro[0][0]), "recall_micro": float(micro[1][0]), "f1_micro": float(micro[2][0]),
        "f1_macro": float(np.mean(f1[has_positive])) if has_positive.any() else None,
        "subset_accuracy": float((predicted == truth).all(1).mean()),
        "per_class": {name: {"ap": ap[c], "precision": float(prec[c]), "recall": float(rec[c]), "f1": float(f1[c]),
                             "threshold": thresholds.values[c], "positives": int(targets[:, c].sum())}
                      for c, name in enumerate(classes)},
    }


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1; 0 where undefined (nothing predicted, or nothing to find)."""
    precision = np.divide(tp, tp + fp, out=np.zeros(tp.shape), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros(tp.shape), where=(tp + fn) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(tp.shape), where=(precision + recall) > 0)
    return precision, recall, f1
