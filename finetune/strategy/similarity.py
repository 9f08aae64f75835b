"""How similar the user's images are to the backbone's pretraining data, measured on cached features.

Several signals, because each alone is confounded:

* ``probe``: a cross-validated linear probe on the final pooled features, as balanced accuracy
  normalised between chance (0) and perfect (1). High when the pretrained features already separate
  the classes; but a hard task on in-domain images also scores low.
* ``depth``: how much of what the middle stage's features miss the top of the network adds:
  (final - middle) / (1 - middle) on the normalised probe scores. On in-domain images the deep,
  semantic layers add most of it; when they add little (or an earlier stage even separates the
  classes better), the top of the network is specialised for something else. Less confounded with
  task difficulty than the probe score itself (docs/decisions.md).
* ``source_confidence``: one minus the normalised entropy of the pretrained source classifier's
  predictions (e.g. ImageNet's 1000 classes). It is sure of itself on images like the ones it was
  trained on and unsure far from them, whatever the user's task.
* ``bn_match``: how well each BatchNorm layer's input statistics on the user's images agree with the
  running statistics stored in the weights (the pretraining distribution): exp(-mean standardised
  shift). Only as good as those statistics (see ../shared/weights/README.md: the shared MobileNet's
  were re-estimated from few photos), so it gets a small weight by default.

Input size: ``probe`` and ``depth`` describe the features a plan trains on, so they are measured at the
size training uses. ``source_confidence`` and ``bn_match`` compare the images with the pretraining
data as the network saw it, so they are measured at the weights' own input size (`source` features):
away from it they follow the resolution rather than the domain (the source classifier grows surer
as images shrink). See docs/decisions.md, "Similarity across input sizes".

The score is the weighted mean of the components present (weights from finetune/configs/strategy.yaml;
models without a source head or without BatchNorm simply lack that component).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from finetune.model.features import FINAL, FeatureSet

log = logging.getLogger(__name__)

COMPONENTS = ("probe", "depth", "source_confidence", "bn_match")


@dataclass(frozen=True)
class StageProbe:
    key: str
    module: str
    channels: int
    balanced_accuracy: float
    normalized: float  # (balanced_accuracy - chance) / (1 - chance), clipped to [0, 1]


@dataclass
class Similarity:
    """Measured domain similarity, with the numbers it was computed from."""

    score: float
    components: dict[str, float]
    weights: dict[str, float]
    probes: list[StageProbe]
    best_stage: str  # stage whose features separate the classes best
    best_earlier_stage: str  # the best stage before the final features
    details: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def not_measured(why: str) -> Similarity:
    """The similarity of a decision that did not measure it (`details["not_measured"]` says why)."""
    return Similarity(float("nan"), {}, {}, [], FINAL, FINAL, {"not_measured": why})


def probe_stage(x: np.ndarray, y: np.ndarray, folds: int = 5, alpha: float = 100.0, seed: int = 0) -> float:
    """Cross-validated balanced accuracy of a linear probe on standardised features.

    A ridge (least-squares) classifier: on these features it ranks stages like logistic regression
    does, at a tenth of the cost (docs/decisions.md).
    """
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y)
    n_splits = int(min(folds, counts[counts > 0].min()))
    if n_splits < 2:
        return float("nan")
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=alpha))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant feature columns (dead channels) are harmless here
        pred = cross_val_predict(probe, x, y, cv=cv)
    return float(balanced_accuracy_score(y, pred))


def probe_all_stages(features: FeatureSet, folds: int = 5, alpha: float = 100.0) -> list[StageProbe]:
    probes = []
    for stage in features.stages:
        x, y = features.matrix(stage.key)
        chance = 1.0 / max(1, len(np.unique(y)))
        acc = probe_stage(x, y, folds, alpha)
        norm = float(np.clip((acc - chance) / (1.0 - chance), 0.0, 1.0)) if not math.isnan(acc) else 0.0
        probes.append(StageProbe(stage.key, stage.module, stage.channels, round(acc, 4), round(norm, 4)))
        log.debug("probe %s (%s, %d ch): balanced acc %.3f, normalised %.3f", stage.key, stage.module,
                 stage.channels, acc, norm)
    return probes


def source_confidence(logits: np.ndarray) -> dict[str, float]:
    """Mean top-1 probability and mean normalised entropy of the source classifier."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1) / math.log(p.shape[1])
    return {"source_top1_prob": float(p.max(axis=1).mean()), "source_entropy": float(entropy.mean())}


def bn_shift(bn_stats: Mapping[str, Mapping[str, np.ndarray]], eps: float = 1e-5) -> float:
    """Mean over BatchNorm layers of the per-channel standardised shift between the user's input
    statistics and the stored running statistics (mean shift in source standard deviations, plus
    the absolute log ratio of the variances)."""
    shifts = []
    for stats in bn_stats.values():
        sd = np.sqrt(stats["running_var"].astype(np.float64) + eps)
        mean_shift = np.abs(stats["mean"] - stats["running_mean"]) / sd
        var_ratio = np.abs(np.log((stats["var"] + eps) / (stats["running_var"] + eps)))
        shifts.append(float(np.mean(mean_shift + 0.5 * var_ratio)))
    return float(np.mean(shifts)) if shifts else float("nan")


def measure(features: FeatureSet, weights: Mapping[str, float], folds: int = 5, alpha: float = 100.0,
            source: FeatureSet | None = None) -> Similarity:
    """Similarity of the images in `features` (clean view) to the backbone's pretraining data.

    `source`: clean-view features at the weights' own input size, for ``source_confidence`` and
    ``bn_match`` (default: `features`, when training uses that size).
    """
    unknown = set(weights) - set(COMPONENTS)
    assert not unknown, f"unknown similarity components {unknown}"
    probes = probe_all_stages(features, folds, alpha)
    by_key = {p.key: p for p in probes}
    final = by_key[FINAL]
    best = max(probes, key=lambda p: (p.normalized, p.key == FINAL))  # ties go to the final features
    earlier = [p for p in probes if p.key != FINAL]
    best_earlier = max(earlier, key=lambda p: p.normalized).key if earlier else FINAL
    middle = earlier[len(earlier) // 2] if earlier else final
    gap = 1.0 - middle.normalized
    depth = (final.normalized - middle.normalized) / gap if gap > 1e-6 else float(final.normalized >= middle.normalized)
    components: dict[str, float] = {"probe": final.normalized, "depth": float(np.clip(depth, 0.0, 1.0))}
    details: dict[str, float] = {"best_stage_normalized": best.normalized, "middle_stage_normalized": middle.normalized}
    source = source if source is not None else features
    if source.logits is not None:
        conf = source_confidence(source.logits[source.valid])
        details.update(conf)
        components["source_confidence"] = 1.0 - conf["source_entropy"]
    if source.bn_stats:
        shift = bn_shift(source.bn_stats)
        details["bn_shift"] = shift
        components["bn_match"] = math.exp(-shift)
    used = {k: float(w) for k, w in weights.items() if k in components and w > 0}
    total = sum(used.values())
    score = sum(components[k] * w for k, w in used.items()) / total if total else 0.0
    return Similarity(round(score, 4), {k: round(v, 4) for k, v in components.items()}, used, probes,
                      best.key, best_earlier, {k: round(v, 4) for k, v in details.items()})
