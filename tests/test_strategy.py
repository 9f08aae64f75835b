"""The four-scenario decision as a table, its config files, and the similarity arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from finetune.errors import UserError
from finetune.strategy.similarity import bn_shift, not_measured, source_confidence
from finetune.strategy.decide import (SCENARIO_NAMES, Thresholds, decide, load_scenario_defaults, load_thresholds,
                                      pilot_candidates, pilot_separates, resolve_frozen_count,
                                      settle_pilot)

T = Thresholds(large_min_images=1000, large_min_per_class=100, similar_min_score=0.6)
DEFAULTS = {name: load_scenario_defaults(name) for name in SCENARIO_NAMES}


def profile(n_train: int, per_class: float) -> dict:
    return {"n_train": n_train, "per_class_median": per_class}


def similarity(score: float, best: str = "final", best_earlier: str = "stage3") -> dict:
    probes = [{"key": "stage3", "normalized": 0.7}, {"key": "stage4", "normalized": 0.8},
              {"key": "final", "normalized": 0.75 if best != "final" else 0.9}]
    return {"score": score, "components": {"probe": score}, "best_stage": best, "best_earlier_stage": best_earlier,
            "probes": probes}


@pytest.mark.parametrize("n_train, per_class, score, expected", [
    (245, 122, 0.93, "small-similar"),      # hymenoptera-like
    (3068, 220, 0.80, "large-similar"),     # clothing-like
    (2176, 435, 0.40, "large-different"),   # omniglot-like
    (300, 30, 0.40, "small-different"),
    (999, 500, 0.90, "small-similar"),      # just below the image count
    (1000, 100, 0.60, "large-similar"),     # exactly on both thresholds
    (5000, 5, 0.90, "small-similar"),       # many images but few per class: still little data
    (5000, 99.5, 0.59, "small-different"),
])
def test_decision_table(n_train, per_class, score, expected):
    plan = decide(profile(n_train, per_class), similarity(score), T, DEFAULTS, base_epochs=10)
    assert plan.scenario == expected
    assert plan.source == "measured"
    assert plan.train_on_features == expected.startswith("small")
    assert len(plan.reasons) >= 3
    assert str(n_train) in plan.reasons[0] and f"{score:.2f}" in plan.reasons[1]


@pytest.mark.parametrize("scenario, on_features, fraction, lr_mult, epochs, warmup", [
    ("small-similar", True, 0.0, 0.0, 10, 0),
    ("small-different", True, 0.0, 0.0, 10, 0),
    ("large-similar", False, 1.0, 0.5, 10, 10),
    ("large-different", False, 1.0, 0.5, 15, 10),
])
def test_each_scenario_plan(scenario, on_features, fraction, lr_mult, epochs, warmup):
    plan = decide(profile(245, 122), similarity(0.9), T, DEFAULTS, base_epochs=10, forced=scenario)
    assert plan.scenario == scenario and plan.source == "forced"
    assert "small-similar" in plan.reasons[0]  # the measured cell is still reported
    assert (plan.train_on_features, plan.trainable_fraction, plan.backbone_lr_mult) == (on_features, fraction, lr_mult)
    assert (plan.epochs, plan.head_warmup_epochs) == (epochs, warmup)


@pytest.mark.parametrize("sizes, pretrained, explained", [
    ({"image_size": 160, "source_image_size": 224}, True, True),
    ({"image_size": 224, "source_image_size": 224}, True, False),
    ({}, True, False),  # measured before the sizes were recorded
    ({"image_size": 160, "source_image_size": 224}, False, False),  # random init: the cell is not the domain's
])
def test_plan_explains_a_training_size_other_than_the_weights(sizes, pretrained, explained):
    sim = {**similarity(0.9), "details": sizes}
    plan = decide(profile(245, 122), sim, T, DEFAULTS, base_epochs=1, pretrained=pretrained)
    assert any("measured at 160 px" in r and "224 px" in r for r in plan.reasons) == explained


def test_large_different_moves_lower_layers_more_and_longer_than_large_similar():
    sim = decide(profile(3000, 300), similarity(0.9), T, DEFAULTS, base_epochs=10)
    diff = decide(profile(3000, 300), similarity(0.1), T, DEFAULTS, base_epochs=10)
    assert (sim.scenario, diff.scenario) == ("large-similar", "large-different")
    assert diff.layer_decay > sim.layer_decay  # lower layers: a larger share of the top group's LR
    assert diff.epochs > sim.epochs


@pytest.mark.parametrize("best, expected_stage", [("stage4", "stage4"), ("final", "final")])
def test_small_different_head_stage_is_measured(best, expected_stage):
    plan = decide(profile(200, 40), similarity(0.2, best=best), T, DEFAULTS, base_epochs=5)
    assert plan.scenario == "small-different"
    assert plan.head_stage == expected_stage
    small_similar = decide(profile(200, 40), similarity(0.9, best=best), T, DEFAULTS, base_epochs=5)
    assert small_similar.head_stage == "final"  # the similar case always uses the top features


def test_random_init_trains_every_layer():
    plan = decide(profile(100, 50), similarity(0.9), T, DEFAULTS, base_epochs=3, pretrained=False)
    assert plan.scenario == "large-different" and plan.trainable_fraction == 1.0
    assert plan.epochs == 3  # --epochs as given: no "longer schedule" for a domain shift that was not measured
    # Random features: one LR for all, no warm-up of a head on them.
    assert (plan.backbone_lr_mult, plan.layer_decay, plan.head_warmup_epochs) == (1.0, 1.0, 0)
    assert "no pretrained weights" in plan.reasons[0]
    # Forced, the plan keeps its layer-wise LRs, but still no head warm-up on random features (BatchNorm then
    # trains in train mode: the network would not compute the eval-mode features the head was fitted on).
    forced = decide(profile(3000, 300), similarity(0.9), T, DEFAULTS, base_epochs=3, pretrained=False,
                    forced="large-similar")
    assert forced.head_warmup_epochs == 0 and forced.layer_decay == DEFAULTS["large-similar"].layer_decay


def test_overrides():
    plan = decide(profile(3000, 300), similarity(0.9), T, DEFAULTS, base_epochs=4, freeze_groups=2,
                  backbone_lr_mult=0.3)
    assert plan.freeze_groups == 2 and plan.backbone_lr_mult == 0.3
    assert resolve_frozen_count(plan, 8) == 2
    plan = decide(profile(200, 40), similarity(0.9), T, DEFAULTS, base_epochs=4, aug_views=3)
    assert plan.aug_views == 3
    with pytest.raises(UserError, match="--freeze-groups applies to fine-tuning plans"):
        decide(profile(200, 40), similarity(0.9), T, DEFAULTS, base_epochs=4, freeze_groups=1)
    with pytest.raises(UserError, match="Invalid scenario"):
        decide(profile(200, 40), similarity(0.9), T, DEFAULTS, base_epochs=4, forced="medium-similar")


@pytest.mark.parametrize("n, kwargs, message", [
    (200, {"backbone_lr_mult": 0.3}, "--backbone-lr-mult applies to fine-tuning plans"),  # a feature plan
    (3000, {"aug_views": 2}, "--aug-views applies to feature plans"),  # a fine-tuning plan
])
def test_overrides_a_plan_would_ignore_are_refused(n, kwargs, message):
    with pytest.raises(UserError, match=message):
        decide(profile(n, n // 10), similarity(0.9), T, DEFAULTS, base_epochs=4, **kwargs)


@pytest.mark.parametrize("fraction, n_groups, frozen", [(0.5, 8, 4), (0.5, 5, 2), (1.0, 6, 0), (0.1, 6, 5),
                                                        (0.0, 6, 6)])
def test_resolve_frozen_count(fraction, n_groups, frozen):
    plan = decide(profile(3000, 300), similarity(0.9), T, DEFAULTS, base_epochs=1)
    plan.trainable_fraction = fraction
    assert resolve_frozen_count(plan, n_groups) == frozen
    plan.freeze_groups = n_groups + 1
    with pytest.raises(UserError, match="out of range"):
        resolve_frozen_count(plan, n_groups)


def test_shipped_configs_load_and_bad_keys_are_named(tmp_path: Path):
    t = load_thresholds()
    assert t.large_min_images > 0 and 0 < t.similar_min_score < 1
    assert set(t.similarity_weights) <= {"probe", "depth", "source_confidence", "bn_match"}
    bad = tmp_path / "strategy.yaml"
    bad.write_text("large_min_images: 10\nsimilar_threshold: 0.5\n")
    with pytest.raises(UserError, match="similar_threshold.*Valid keys"):
        load_thresholds(bad)
    (tmp_path / "small-similar.yaml").write_text("train_on_features: true\nepochs: 3\n")
    with pytest.raises(UserError, match="Unknown key.*epochs"):
        load_scenario_defaults("small-similar", tmp_path)


def test_source_confidence_separates_sure_from_unsure():
    sure = np.zeros((4, 1000))
    sure[:, 7] = 20.0
    unsure = np.zeros((4, 1000))
    s, u = source_confidence(sure), source_confidence(unsure)
    assert s["source_top1_prob"] > 0.99 and s["source_entropy"] < 0.01
    assert math.isclose(u["source_entropy"], 1.0) and math.isclose(u["source_top1_prob"], 1e-3)


def test_bn_shift_is_zero_for_matching_statistics_and_grows_with_shift():
    rm, rv = np.array([0.0, 1.0]), np.array([1.0, 4.0])
    same = {"l": {"mean": rm, "var": rv, "running_mean": rm, "running_var": rv}}
    moved = {"l": {"mean": rm + 2 * np.sqrt(rv), "var": rv, "running_mean": rm, "running_var": rv}}
    assert bn_shift(same) == pytest.approx(0.0, abs=1e-6)
    assert bn_shift(moved) == pytest.approx(2.0, rel=1e-3)


def signals(score: float, probe: float, depth: float, source_confidence: float, bn_match: float) -> dict:
    return {"score": score, "components": {"probe": probe, "depth": depth, "source_confidence": source_confidence,
                                           "bn_match": bn_match},
            "weights": {"probe": 0.5, "depth": 1.0, "source_confidence": 1.0, "bn_match": 0.5},
            "best_stage": "final", "best_earlier_stage": "stage3", "probes": []}


@pytest.mark.parametrize("n_train, per_class, sim, expected, why", [
    # a lot of data: the table's cell, fine-tuned, no pilot
    (3068, 220, signals(0.80, 0.85, 0.75, 0.80, 0.80), ["large-similar"], "a lot of data"),
    (2176, 435, signals(0.45, 0.55, 0.40, 0.45, 0.40), ["large-different"], "a lot of data"),
    (1000, 100, signals(0.61, 0.61, 0.61, 0.61, 0.61), ["large-similar"], "a lot of data"),
    # little data: both linear heads, the measured cell first
    (245, 122, signals(0.88, 0.94, 0.88, 0.88, 0.83), ["small-similar", "small-different"], "little data"),
    (300, 30, signals(0.40, 0.40, 0.40, 0.40, 0.40), ["small-different", "small-similar"], "little data"),
    (999, 500, signals(0.85, 0.85, 0.85, 0.85, 0.85), ["small-similar", "small-different"], "little data"),
    # many images but very few per class: little data
    (5000, 5, signals(0.85, 0.85, 0.85, 0.85, 0.85), ["small-similar", "small-different"], "little data"),
])
def test_pilot_candidates(n_train, per_class, sim, expected, why):
    candidates, reasons = pilot_candidates(profile(n_train, per_class), sim, T)
    assert candidates == expected
    assert candidates[0] == decide(profile(n_train, per_class), sim, T, DEFAULTS, base_epochs=1).scenario
    assert any(why in r for r in reasons), reasons


@pytest.mark.parametrize("domain, scores, expected, why", [
    # the better head is good enough: it goes on
    ("similar", {"small-similar": 0.90, "small-different": 0.80}, "small-similar", ">= 0.85"),
    ("similar", {"small-similar": 0.80, "small-different": 0.86}, "small-different", ">= 0.85"),
    ("different", {"small-different": 0.85, "small-similar": 0.70}, "small-different", ">= 0.85"),  # on the line
    # the head on the final features wins a tie and a lead under earlier_head_min_gain (0.05), whatever the cell
    ("different", {"small-different": 0.95, "small-similar": 0.95}, "small-similar", ">= 0.85"),
    ("different", {"small-different": 0.94, "small-similar": 0.90}, "small-similar", ">= 0.85"),
    ("different", {"small-different": 0.95, "small-similar": 0.90}, "small-different", ">= 0.85"),  # on the line
    # a small lead of the earlier stage is not enough to leave the final head, and that head is not good enough
    ("different", {"small-different": 0.87, "small-similar": 0.84}, "large-different", "small-similar, gets only"),
    # only the earlier stage's head ran (the other refused an option): it is the better one
    ("different", {"small-different": 0.90}, "small-different", ">= 0.85"),
    # neither head is good enough: the network is fine-tuned, the measured domain choosing how
    ("similar", {"small-similar": 0.84, "small-different": 0.60}, "large-similar", "< 0.85"),
    ("different", {"small-different": 0.50, "small-similar": 0.70}, "large-different", "< 0.85"),
    # no head could run (an option they refuse): fine-tuning
    ("similar", {}, "large-similar", "no linear head"),
])
def test_settle_pilot_keeps_a_linear_head_only_where_it_is_good(domain, scores, expected, why):
    chosen, reason = settle_pilot(domain, scores, T)
    assert chosen == expected
    assert why in reason, reason


def test_an_option_only_a_linear_head_honours_keeps_the_better_head_and_says_so():
    chosen, why = settle_pilot("similar", {"small-similar": 0.60, "small-different": 0.70}, T, linear_only="--aug-views")
    assert chosen == "small-different" and "--aug-views applies to linear heads only" in why
    assert settle_pilot("similar", {"small-similar": 0.90}, T, linear_only="--aug-views")[0] == "small-similar"


def test_the_linear_head_threshold_is_configurable_and_checked(tmp_path: Path):
    assert 0 < load_thresholds().linear_min_select_acc < 1
    strict = Thresholds(**{**vars(T), "linear_min_select_acc": 0.95})
    assert settle_pilot("similar", {"small-similar": 0.90}, strict)[0] == "large-similar"
    assert settle_pilot("similar", {"small-similar": 0.90}, T)[0] == "small-similar"
    bad = tmp_path / "strategy.yaml"
    bad.write_text("linear_min_select_acc: 1.5\n")
    with pytest.raises(UserError, match=r"linear_min_select_acc must be in \[0, 1\]"):
        load_thresholds(bad)
    bad.write_text("earlier_head_min_gain: -0.1\n")
    with pytest.raises(UserError, match=r"earlier_head_min_gain must be in \[0, 1\]"):
        load_thresholds(bad)
    eager = Thresholds(**{**vars(T), "earlier_head_min_gain": 0.0})  # no margin: the better score, a tie to final
    assert settle_pilot("different", {"small-different": 0.91, "small-similar": 0.90}, eager)[0] == "small-different"
    assert settle_pilot("different", {"small-different": 0.91, "small-similar": 0.90}, T)[0] == "small-similar"
    bad.write_text("pilot_band: 0.08\n")  # a key of earlier versions: named, not silently ignored
    with pytest.raises(UserError, match="Unknown key"):
        load_thresholds(bad)


@pytest.mark.parametrize("winner_only, other_only, separated", [
    (0, 0, False),    # the same answers on every selection image: no evidence either way
    (1, 0, False),    # one image (0.6 points on 153, 2.5 on 40) is not a difference
    (3, 0, False),    # 3 images all one way: 9 <= 1.96^2 * 3 = 11.5
    (4, 0, True),     # 16 > 1.96^2 * 4 = 15.4
    (5, 5, False),    # they disagree often but split evenly: a tie
    (11, 4, False),   # 7 net on 15 disagreements: 49 <= 57.6
    (12, 4, True),    # 8 net on 16: 64 > 61.5
    (30, 20, False),  # 10 net on 50: the accuracies differ, the selection images cannot tell which is better
])
def test_pilot_separates_only_beyond_the_noise_of_the_disagreeing_images(winner_only, other_only, separated):
    assert pilot_separates(winner_only, other_only) is separated




@pytest.mark.parametrize("forced, n_train, expected, source", [
    ("auto", 300, "large-different", "multi-label"),  # little data too: the domain is not measured
    ("auto", 5000, "large-different", "multi-label"),
    ("large-similar", 300, "large-similar", "forced"),
    ("large-different", 5000, "large-different", "forced"),
])
def test_several_labels_per_image_fine_tune_after_a_logistic_head_warm_up(forced, n_train, expected, source):
    plan = decide(profile(n_train, n_train / 4), not_measured("several labels per image").to_dict(), T, DEFAULTS,
                  base_epochs=10, forced=forced, multi_label=True)
    assert (plan.scenario, plan.source, plan.train_on_features) == (expected, source, False)
    assert plan.head_warmup_epochs == DEFAULTS[expected].head_warmup_epochs > 0
    assert any("several labels per image" in r for r in plan.reasons)
    assert any("one-vs-rest logistic regression" in r for r in plan.reasons)


@pytest.mark.parametrize("forced", ["small-similar", "small-different"])
def test_a_linear_head_is_refused_for_several_labels_per_image(forced):
    with pytest.raises(UserError, match="takes one label per image"):
        decide(profile(300, 75), not_measured("x").to_dict(), T, DEFAULTS, base_epochs=10, forced=forced,
               multi_label=True)
