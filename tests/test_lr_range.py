"""The LR range test's suggestion (issue 13): read on synthetic curves, against Lightning's own rule,
and the per-group LR ratios a plan's groups keep while Lightning's finder sets one LR for all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_lightning.tuner.lr_finder import _LRFinder

from finetune.training.lr_range import hold_lr_ratios, read_curve, suggest_lr

LRS = np.logspace(-6, 0, 100)
X = np.log10(LRS)


def valley(center: float = -3.5) -> np.ndarray:
    """A loss that falls around 10**center and blows up past 10**-1.5."""
    return 1.0 - 0.8 / (1 + np.exp(-(X - center) / 0.3)) + np.exp(4 * (X + 1.5))


def with_bump() -> np.ndarray:
    """The valley, with a bump early in the curve (the first batches' noise, kept by the smoothing)."""
    return valley() + 0.3 * np.exp(-((X + 5.2) / 0.15) ** 2)


def noisy() -> np.ndarray:
    return valley() + np.random.default_rng(0).normal(0, 0.05, len(X))


def lightning_suggestion(losses: np.ndarray) -> float:
    finder = _LRFinder("exponential", LRS[0], LRS[-1], len(LRS))
    finder.results = {"lr": list(LRS), "loss": list(losses)}
    return finder.suggestion()


@pytest.mark.parametrize("name, losses, beta, low, high", [
    ("clean valley", valley(), 0.0, 10 ** -4.0, 10 ** -3.0),
    ("bump at the start", with_bump(), 0.0, 10 ** -4.0, 10 ** -3.0),
    ("noisy", noisy(), 0.9, 10 ** -4.5, 10 ** -2.5),
])
def test_suggestion_is_on_the_descent_before_the_minimum(name, losses, beta, low, high):
    lr = suggest_lr(LRS, losses, beta=beta)
    reading = read_curve(LRS, losses, beta=beta)
    assert lr is not None, name
    assert low <= lr <= high, (name, lr)
    # On the falling part: after the descent starts, before the minimum, and the loss there is falling.
    assert LRS[reading.descent_start] <= lr < LRS[reading.minimum], name
    assert reading.smoothed[reading.steepest + 1] < reading.smoothed[reading.steepest - 1], name


def test_lightnings_rule_picks_the_bump_and_suggest_lr_does_not():
    losses = with_bump()
    assert lightning_suggestion(losses) < 1e-4  # on the bump, orders of magnitude below the valley
    assert suggest_lr(LRS, losses) > 1e-4


@pytest.mark.parametrize("name, losses", [
    ("flat", np.full(len(X), 0.7) + np.random.default_rng(1).normal(0, 0.002, len(X))),
    ("diverging", 0.7 + np.exp(X + 1)),
    ("too short", np.array([1.0, 0.5, 0.2])),
])
def test_no_suggestion_without_a_descent(name, losses):
    assert suggest_lr(LRS[:len(losses)], losses, beta=0.9) is None, name


def test_nan_losses_are_skipped():
    losses = valley()
    losses[[20, 60]] = np.nan
    assert 1e-4 <= suggest_lr(LRS, losses) <= 1e-3


def test_group_lrs_keep_their_ratio_to_the_head_when_one_lr_is_set_for_all():
    backbone, head = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [backbone], "lr": 1e-4}, {"params": [head], "lr": 1e-3}], lr=1e-3)
    assert hold_lr_ratios(opt, head_lr=1e-3) == pytest.approx([0.1, 1.0])
    for g in opt.param_groups:  # what Lightning's finder does: one LR for every group
        g["lr"] = 0.5
    (backbone + head).sum().backward()
    opt.step()
    assert backbone.item() == pytest.approx(-0.05) and head.item() == pytest.approx(-0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]  # the scheduled value is put back
