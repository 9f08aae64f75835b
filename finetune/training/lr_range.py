"""The learning-rate range test: reading its curve, and keeping a plan's per-group LR ratios while it runs.

Lightning's `Tuner.lr_find` grows the LR exponentially, one step per batch, and records the loss
smoothed with fastai's debiased moving average (beta 0.98). Its own `suggestion()` is the steepest
slope of that curve against the LR on a linear scale after skipping 10 points: at small LRs the points
are so close together that any early wiggle (the first batches' noise, a bump) has the steepest
slope, and it suggests LRs orders of magnitude below the valley of the very plot it draws (issue 13).

`suggest_lr` reads the curve on the log-LR axis it is plotted on: ignore the noisy start, find the
minimum of the (smoothed) loss, go back from it over the last sustained descent, and pick the
steepest point of that descent. A bump before the descent is never in that window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

SKIP_START = 0.1  # fraction of the curve ignored at its start: the first batches' noise
FALLING = 0.1  # "clearly falling": per decade of LR, by more than this fraction of the drop to the minimum
MIN_DROP = 0.02  # a descent must lower the loss by at least this fraction of its level


@dataclass(frozen=True)
class CurveReading:
    """Indices into the curve: its minimum, where the descent to it starts, and its steepest point."""

    smoothed: np.ndarray
    minimum: int
    descent_start: int
    steepest: int | None  # None: no clear descent


def smooth(losses: Sequence[float], beta: float) -> np.ndarray:
    """fastai's (and Lightning's) debiased exponential moving average; beta 0 returns the losses."""
    values = np.asarray(losses, dtype=np.float64)
    if beta <= 0:
        return values.copy()
    out = np.empty_like(values)
    avg = 0.0
    for i, x in enumerate(values):
        avg = beta * avg + (1 - beta) * x
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def read_curve(lrs: Sequence[float], losses: Sequence[float], beta: float = 0.0) -> CurveReading | None:
    """Minimum, last sustained descent and its steepest point (slopes against log10 LR); None when the
    curve has too few finite points to read."""
    lr = np.asarray(lrs, dtype=np.float64)
    keep = np.isfinite(np.asarray(losses, dtype=np.float64)) & (lr > 0)
    lr, loss = lr[keep], smooth(np.asarray(losses, dtype=np.float64)[keep], beta)
    if len(loss) < 5:
        return None
    start = max(1, int(math.ceil(SKIP_START * len(loss))))
    minimum = start + int(np.argmin(loss[start:]))
    slope = np.gradient(loss, np.log10(lr))
    # "Clearly falling": by more than FALLING of the curve's whole drop per decade of LR.
    tol = FALLING * float(loss[start:minimum + 1].max() - loss[minimum])
    j = minimum
    while j > start and abs(slope[j - 1]) <= tol:  # back over the valley's floor
        j -= 1
    while j > start and slope[j - 1] < -tol:  # back over the descent into it
        j -= 1
    window = slope[j:minimum + 1]
    if tol <= MIN_DROP * FALLING * max(abs(loss[minimum]), 1e-12) or window.min() >= -tol:
        return CurveReading(loss, minimum, j, None)
    return CurveReading(loss, minimum, j, j + int(np.argmin(window)))


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], beta: float = 0.0) -> float | None:
    """The LR at the steepest point of the last sustained descent before the loss minimum, or None when
    the curve never clearly falls (flat, diverging, or too short).

    Args:
        lrs: increasing learning rates, one per step.
        losses: the loss at each step; raw (pass `beta`, e.g. 0.98) or already smoothed (Lightning's: beta 0).
        beta: moving-average smoothing applied first.
    """
    reading = read_curve(lrs, losses, beta)
    if reading is None or reading.steepest is None:
        return None
    finite = [x for x, y in zip(lrs, losses) if x > 0 and math.isfinite(y)]
    return float(finite[reading.steepest])


def hold_lr_ratios(optimizer: torch.optim.Optimizer, head_lr: float) -> list[float]:
    """Keep each param group's LR at its ratio to the head's while the range test sets them all alike.

    Lightning's LR finder overwrites every group's LR with one value (`_LRFinder._exchange_scheduler`):
    a plan's groups (head LR x backbone multiplier x layer decay^depth) would all move at the head's LR.
    The ratios are taken now, from the plan's LRs; around each optimizer step, every group's LR is
    multiplied by its ratio and put back afterwards, so the scheduled value stays the head LR.
    """
    ratios = [float(g["lr"]) / head_lr for g in optimizer.param_groups]
    scheduled: list[float] = []

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        scheduled[:] = [g["lr"] for g in opt.param_groups]
        for g, ratio in zip(opt.param_groups, ratios):
            g["lr"] = g["lr"] * ratio

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for g, lr in zip(opt.param_groups, scheduled):
            g["lr"] = lr

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return ratios
