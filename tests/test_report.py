"""The evaluation report's accuracy and its interval."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.evaluation.evaluate import accuracy_interval, report


@pytest.mark.parametrize("right, images, low, high", [
    # Wilson 95% intervals (z = 1.96), worked by hand: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    (143, 153, 0.8839, 0.9641),
    (50, 100, 0.4038, 0.5962),
    (10, 10, 0.7225, 1.0),
    (0, 20, 0.0, 0.1611),
])
def test_accuracy_interval_is_wilsons(right, images, low, high):
    assert accuracy_interval(right, images) == pytest.approx([low, high], abs=1e-4)


def test_the_interval_narrows_with_more_images_and_is_nan_without_any():
    small, large = accuracy_interval(9, 10), accuracy_interval(900, 1000)
    assert small[1] - small[0] > 3 * (large[1] - large[0])
    assert all(np.isnan(accuracy_interval(0, 0)))


def test_report_gives_top1_with_its_interval_over_the_scored_images():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [np.nan, np.nan]])  # the last image failed to load
    labels = np.array([0, 1, 1, 0])
    r = report(probs, labels, ["a", "b"])
    assert r["images"] == 3 and r["top1"] == pytest.approx(2 / 3)
    assert r["top1_ci95"] == pytest.approx(accuracy_interval(2, 3))
