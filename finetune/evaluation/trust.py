"""Choices made after training on held-out training images: the crop mode, the temperature, the unknown threshold.

One pass over the held-out training images (the selection split of a network plan, or each fold of a
feature plan with its out-of-fold head, from cached crop features) gives per-crop logits and features. From
them, in this order:

1. the crop mode (`--tta auto`: the best of centre / 5crop / 10crop, `evaluation.tta.pick_mode`; or the
   user's `--tta`);
2. the temperature: the T that minimises the negative log-likelihood of ``mean softmax(logits / T)`` over
   the mode's crops (temperature scaling, Guo et al. 2017);
3. the unknown threshold: the `KEEP_SHARE` quantile of the held-out images' unknown scores against the
   images their model fitted on (`model.scoring`), so that share of in-distribution images is kept.

Val and test are never read here. `calibration_report` and `plot_reliability` describe calibration on a
split, to report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from finetune import runtime, timing
from finetune.config import TTA_MAX_IMAGES
from finetune.data.crops import TTA_VIEWS, CropViews
from finetune.data.profile import stratified_subset
from finetune.errors import UserError
from finetune.evaluation.tta import AUTO_CANDIDATES, mode_scores, pick_mode, source_outputs
from finetune.model.scoring import calibrated_probs, knn_score, pooled_features

log = logging.getLogger(__name__)

KEEP_SHARE = 0.95  # in-distribution images kept by the unknown threshold (issue 15)
KNN_K = 5  # neighbour whose similarity is the unknown score (bench/trust.py, docs/decisions.md)
TEMPERATURE_RANGE = (0.05, 20.0)
LOG_T_PRIOR_SD = 0.5  # prior on log T: T within about 0.37-2.7 unless the held-out images say otherwise
ECE_BINS = 15


@dataclass
class HeldOutOutputs:
    """Per-crop logits [N, V, K] and features [N, V, C], labels [N], and each image's bank (index into `banks`).
    A bank in `own_banks` is made of the held-out images it scores (each one is left out of its own score)."""

    logits: torch.Tensor
    features: torch.Tensor
    labels: np.ndarray
    bank_of: np.ndarray
    banks: list[torch.Tensor]
    views: str  # the crops of the pass: "10crop" (any mode can be scored) or the one mode asked for
    own_banks: set[int] = field(default_factory=set)


def fit_temperature(logits: torch.Tensor, labels: np.ndarray) -> float:
    """The temperature maximising the posterior of ``mean_v softmax(logits / T)`` (logits [N, V, K]): the summed
    negative log-likelihood plus a Gaussian prior on log T (`LOG_T_PRIOR_SD`, centred on T = 1). With many
    held-out images the data decide; with few (a 49-image selection split) or none wrong, T stays near 1
    instead of running to the end of the range (all-correct images make the NLL fall forever as T shrinks).
    1.0 without data."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        return 1.0
    z = logits.double()
    y = torch.as_tensor(labels, dtype=torch.long)

    def objective(log_t: float) -> float:
        p = calibrated_probs(z, math.exp(log_t)).double()
        nll = float(-torch.log(p[torch.arange(len(y)), y].clamp_min(1e-300)).sum())
        return nll + 0.5 * (log_t / LOG_T_PRIOR_SD) ** 2

    lo, hi = (math.log(v) for v in TEMPERATURE_RANGE)
    return float(math.exp(minimize_scalar(objective, bounds=(lo, hi), method="bounded").x))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error (top-label, L1, equal-width bins) over rows without NaN (torchmetrics)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    ok = ~np.isnan(probs).any(axis=1)
    if not ok.any():
        return float("nan")
    p = torch.as_tensor(probs[ok], dtype=torch.float32)
    return float(multiclass_calibration_error(p, torch.as_tensor(labels[ok]), num_classes=p.shape[1], n_bins=bins))


def heldout_outputs(heldout: Sequence[Any], views: str, data_config: dict[str, Any], batch_size: int = 32,
                    max_pixels: int | None = None, rt: runtime.Runtime | None = None,
                    max_images: int = TTA_MAX_IMAGES) -> HeldOutOutputs:
    """One pass over the held-out training images of every `plan_context.HeldOut` (at most `max_images` in all,
    stratified, for network plans; feature plans read their cached crops): per-crop logits and features. A
    held-out set without a bank of its own (network plans) is its own bank: its centre-crop features."""
    total = sum(len(h.samples) for h in heldout)
    logits, feats, labels, bank_of, banks, own = [], [], [], [], [], set()
    for h in heldout:
        if h.per_view is not None:  # a feature plan's fold: its out-of-fold head on cached crop features
            z, f, y = h.per_view()
            z, f = torch.as_tensor(z), torch.as_tensor(f)
            if views != "10crop":
                z, f = z[:, AUTO_CANDIDATES[views]], f[:, AUTO_CANDIDATES[views]]
        else:
            share = min(1.0, max_images / max(total, 1))
            samples = stratified_subset(h.samples, max(1, round(len(h.samples) * share)))
            out = source_outputs(h.net(), [s.path for s in samples], data_config, views,
                                 max(1, batch_size // TTA_VIEWS[views]), max_pixels, rt)
            ok = ~torch.isnan(out.logits).any(dim=2).any(dim=1)
            z, f = out.logits[ok], out.features[ok]
            y = np.array([s.label for s in samples], dtype=int)[ok.numpy()]
        logits.append(z.float())
        feats.append(f.float())
        labels.append(np.asarray(y, dtype=int))
        bank_of.append(np.full(len(y), len(banks)))
        if h.bank is None:
            own.add(len(banks))
        banks.append(h.bank() if h.bank is not None else pooled_features(feats[-1]))
    return HeldOutOutputs(torch.cat(logits), torch.cat(feats), np.concatenate(labels), np.concatenate(bank_of),
                          banks, views, own)


def unknown_scores(out: HeldOutOutputs, k: int = KNN_K) -> np.ndarray:
    """Each held-out image's unknown score (its centre crop) against its own model's bank; against a bank made of
    the held-out images themselves, leaving the image out (its own row is its nearest neighbour: k + 1)."""
    scores = np.zeros(len(out.labels))
    pooled = pooled_features(out.features)  # the centre crop's, whatever the mode (model.scoring)
    for b, bank in enumerate(out.banks):
        rows = np.flatnonzero(out.bank_of == b)
        if len(rows) and len(bank) > (b in out.own_banks):
            scores[rows] = knn_score(pooled[rows], bank, k + (b in out.own_banks)).numpy()
    return scores


@timing.timed("crops, temperature, unknown threshold")
def choose_after_training(requested: str, heldout: Sequence[Any], data_config: dict[str, Any], **kwargs: Any
                          ) -> dict[str, Any]:
    """The crop mode, the temperature and the unknown threshold, from held-out training images (module doc).

    `requested`: "auto" or an explicit crop mode (which then is only honoured). Returns {"mode", "chosen_by",
    "scores" (auto), "temperature", "ood" (the `ModelSpec.ood` entry, without the bank), "heldout_images"}."""
    auto = requested == "auto"
    mode = "center" if requested in ("none", "auto") else requested
    chosen_by = "--tta"
    if auto:
        try:
            CropViews(data_config, "10crop")
        except UserError:
            auto, chosen_by = False, "auto: the model's eval transform has no centre crop to move"
    out = heldout_outputs(heldout, "10crop" if auto else mode, data_config, **kwargs)
    result: dict[str, Any] = {"mode": mode, "chosen_by": chosen_by}
    if auto:
        probs = out.logits.softmax(dim=-1).numpy()
        result["scores"] = mode_scores(probs, out.labels)
        mode = result["mode"] = pick_mode(result["scores"])
        result["chosen_by"] = (f"auto: best accuracy on {len(out.labels)} held-out training images "
                               "(ties go to fewer crops)")
    index = AUTO_CANDIDATES[mode] if out.views == "10crop" else list(range(out.logits.shape[1]))
    result["temperature"] = fit_temperature(out.logits[:, index], out.labels)
    scores = unknown_scores(out)
    result["ood"] = ({"method": "knn", "k": KNN_K, "threshold": float(np.quantile(scores, KEEP_SHARE)),
                      "kept": KEEP_SHARE, "heldout_images": int(len(scores))} if len(scores) else None)
    result["heldout_images"] = int(len(out.labels))
    result["banks"] = out.banks
    log.info("After training, on %d held-out training images: crops %s, temperature %.3f, unknown threshold %s",
             len(out.labels), mode, result["temperature"],
             "n/a" if result["ood"] is None else f"{result['ood']['threshold']:.4f}")
    return result
