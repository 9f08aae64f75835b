"""What a plan will cost, estimated before it runs from how fast the backbone ran over the user's images.

Pure (no torch). The measurement times its pass over the training images (`FeatureSet.images_per_s`, images
through the backbone per second, forward only, on this machine with this runtime); a run costs about:

* a fine-tuning plan: `FINETUNE_PASSES` forward-equivalents per training image per epoch (the forward, the
  backward, about twice the forward, and the data pipeline), plus one pass over val and test to report;
* a linear head: one pass per augmented view of each training image (the head on cached features costs
  seconds), plus the report's pass.

Checked against real runs in docs/decisions.md ("What a run costs"); it is an estimate, said as one.
"""

from __future__ import annotations

from typing import Any, Mapping

FINETUNE_PASSES = 3.0


def estimate_seconds(plan: Any, profile: Mapping[str, Any], images_per_s: float | None) -> float | None:
    """The plan's training and reporting time in seconds, or None without a measured speed."""
    if not images_per_s:
        return None
    n_train = int(profile["n_train"])
    report = int(profile.get("n_val", 0)) + int(profile.get("n_test", 0))
    if plan.train_on_features:
        passes = plan.aug_views * n_train
    else:
        passes = FINETUNE_PASSES * plan.epochs * n_train
    return (passes + report) / images_per_s


def estimate_sentence(plan: Any, profile: Mapping[str, Any], images_per_s: float | None) -> str:
    """The estimate, in words, with what it rests on."""
    seconds = estimate_seconds(plan, profile, images_per_s)
    if seconds is None:
        return "no estimate (the backbone's speed was not measured)"
    epochs = f"{plan.epochs} epoch{'s' if plan.epochs != 1 else ''}"
    what = (f"{epochs} fine-tuning {profile['n_train']} images" if not plan.train_on_features else
            f"a linear head on cached features, {plan.aug_views} augmented views per image" if plan.aug_views else
            "a linear head on cached features")
    return (f"about {_duration(seconds)} to train and report ({what}; the backbone ran at {images_per_s:.0f} "
            "images/s here)")


def pilot_sentence(candidates: int, select_images: int, images_per_s: float | None) -> str:
    """What a pilot of linear heads costs: each scores the selection images through the backbone once (their
    training reads cached features: a small part of it)."""
    if not images_per_s:
        return "no estimate (the backbone's speed was not measured)"
    return (f"about {_duration(candidates * select_images / images_per_s)} ({candidates} heads on cached features, "
            f"each scored on {select_images} selection images)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
