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

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.metrics import precision_recall_curve
from torchmetrics.functional.classification import multilabel_average_precision

from finetune import timing
from finetune.data.folders import Sample
from finetune.data.multilabel import label_matrix, per_class_ap
from finetune.data.images import display_path
from finetune.evaluation.tta import source_outputs
from finetune.files import atomic_write, write_json

log = logging.getLogger(__name__)

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
    ap = per_class_ap(probs, targets)
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


# --- after training: thresholds on held-out training images, then val and test read once -----------------------

def _probs_and_targets(net: Any, samples: Sequence[Sample], num_classes: int, data_config: dict[str, Any],
                       batch_size: int, max_pixels: int | None, rt: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigmoid probabilities (centre crop), 0/1 targets and the mask of images that decoded."""
    out = source_outputs(net, [s.path for s in samples], data_config, "center", batch_size, max_pixels, rt)
    probs = torch.sigmoid(out.logits[:, 0].float()).numpy() if len(samples) else np.zeros((0, num_classes))
    ok = ~np.isnan(probs).any(axis=1)
    return probs, label_matrix([s.labels for s in samples], num_classes), ok


@timing.timed("thresholds")
def thresholds_after_training(heldout: Sequence[Any], num_classes: int, data_config: dict[str, Any],
                              target_precision: float | None, batch_size: int, max_pixels: int | None,
                              rt: Any) -> dict[str, Any]:
    """A multi-label network's per-class thresholds, on the held-out training images (the selection split), in
    the shape of `trust.choose_after_training`'s result: the centre crop, no temperature, no unknown score."""
    probs, targets = [], []
    for h in heldout:
        p, t, ok = _probs_and_targets(h.net(), h.samples, num_classes, data_config, batch_size, max_pixels, rt)
        probs.append(p[ok])
        targets.append(t[ok])
    p, t = np.concatenate(probs), np.concatenate(targets)
    chosen = choose_thresholds(p, t, target_precision)
    rule = "best F1" if target_precision is None else f"precision {target_precision:g}"
    log.info("Thresholds per class (%s on %d held-out training images): %s", rule, len(p),
             ", ".join(f"{v:.3f}" for v in chosen.values))
    return {"mode": "center", "chosen_by": "several labels per image: the centre crop", "temperature": 1.0,
            "ood": None, "heldout_images": int(len(p)), "banks": [torch.empty(0, 0)], "thresholds": chosen}


@timing.timed("evaluate")
def evaluate_parts(net: Any, spec: Any, parts: dict[str, Sequence[Sample]], output: Path, batch_size: int,
                   max_pixels: int | None, rt: Any) -> dict[str, float]:
    """Each split's multi-label report (OUTPUT/evaluation/<split>/report.json, predictions.csv), read once; the
    flat metrics (<split>_map_macro, _map_micro, _f1_macro, _f1_micro, _precision_micro, _recall_micro,
    _subset_accuracy) for the summary and MLflow."""
    thresholds = Thresholds(list(spec.thresholds), [])
    flat: dict[str, float] = {}
    for name, samples in parts.items():
        if not samples:
            continue
        p, t, ok = _probs_and_targets(net, samples, spec.num_classes, spec.data_config, batch_size, max_pixels, rt)
        result = {"images": int(ok.sum()), "failed_images": int((~ok).sum()),
                  **metrics(p[ok], t[ok], thresholds, spec.class_names)}
        folder = Path(output) / "evaluation" / name
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "report.json", result)
        _write_predictions(folder / "predictions.csv", [s for s, good in zip(samples, ok) if good], p[ok],
                           predict_sets(p[ok], thresholds), spec.class_names)
        flat.update({f"{name}_{k}": float(v) for k, v in result.items()
                     if k not in ("per_class", "images", "failed_images") and v is not None})
        log.info("%s: mAP %.4f (macro), F1 %.4f (micro), subset accuracy %.4f on %d images", name,
                 result["map_macro"] if result["map_macro"] is not None else float("nan"), result["f1_micro"],
                 result["subset_accuracy"], result["images"])
    return flat


def _write_predictions(path: Path, samples: Sequence[Sample], probs: np.ndarray, chosen: np.ndarray,
                       class_names: list[str]) -> None:
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "true_labels", *class_names])
        for s, p, c in zip(samples, probs, chosen):
            writer.writerow([display_path(s.path), ";".join(n for n, on in zip(class_names, c) if on),
                             ";".join(class_names[i] for i in s.labels), *(f"{v:.6g}" for v in p)])
