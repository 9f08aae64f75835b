"""strategy.cost: a run's time, estimated from the measured speed of the backbone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from finetune.strategy.cost import FINETUNE_PASSES, estimate_seconds, estimate_sentence

PROFILE = {"n_train": 200, "n_val": 50, "n_test": 50}


def plan(on_features: bool, epochs: int = 3, aug_views: int = 0):
    return SimpleNamespace(train_on_features=on_features, epochs=epochs, aug_views=aug_views)


@pytest.mark.parametrize("the_plan, passes", [
    (plan(False, epochs=3), FINETUNE_PASSES * 3 * 200 + 100),  # fine-tuning: every epoch, then the report
    (plan(False, epochs=6), FINETUNE_PASSES * 6 * 200 + 100),  # twice the epochs: about twice the time
    (plan(True, aug_views=10), 10 * 200 + 100),  # a linear head: its augmented views, then the report
    (plan(True), 100),  # on the features already cached: the report alone
])
def test_the_estimate_counts_the_backbone_passes_a_plan_makes(the_plan, passes):
    assert estimate_seconds(the_plan, PROFILE, images_per_s=50.0) == pytest.approx(passes / 50.0)
    assert estimate_seconds(the_plan, PROFILE, images_per_s=100.0) == pytest.approx(passes / 100.0)


def test_without_a_measured_speed_there_is_no_estimate_and_the_sentence_says_so():
    assert estimate_seconds(plan(False), PROFILE, None) is None
    assert "no estimate" in estimate_sentence(plan(False), PROFILE, None)


@pytest.mark.parametrize("rate, words", [(100.0, "about 19 s"), (1.0, "about 32 min"), (0.1, "about 5.3 h")])
def test_the_sentence_gives_the_duration_and_what_it_rests_on(rate, words):
    sentence = estimate_sentence(plan(False, epochs=3), PROFILE, rate)
    assert sentence.startswith(words) and "3 epochs fine-tuning 200 images" in sentence


def test_the_pilot_states_its_cost_from_the_selection_images_it_scores():
    from finetune.strategy.cost import pilot_sentence

    assert pilot_sentence(2, 50, 20.0).startswith("about 5 s (2 heads on cached features, each scored on 50")
    assert "no estimate" in pilot_sentence(2, 50, None)
