"""Feature plans (small-*: a linear head on frozen, cached features) honour the recipe options that act on
a linear head (class weights, balanced sampling, label smoothing, a fixed weight decay), refuse the ones
that cannot act on it, and `sweep` searches only what acts in the plan it tunes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import RandomSampler, WeightedRandomSampler

from finetune.cli import cli
from finetune.config import TrainConfig
from finetune.errors import UserError
from finetune.strategy.decide import SCENARIO_NAMES, decide, load_scenario_defaults, load_thresholds
from finetune.training import linear_probe
from finetune.training.linear_probe import fit_linear_head
from finetune.training.optim import make_optimizer_factory
from finetune.training.recipe import NOT_ON_FEATURES, check_feature_plan_options, class_weights, resolve_recipe
from finetune.workflows.sweep import search_space
from tests.conftest import tiny_train_args

DEFAULTS = {name: load_scenario_defaults(name) for name in SCENARIO_NAMES}
SIMILARITY = {"score": 0.9, "components": {}, "best_stage": "final", "best_earlier_stage": "stage3", "probes": []}


def _plan(scenario: str, **overrides):
    return decide({"n_train": 100, "per_class_median": 50}, SIMILARITY, load_thresholds(), DEFAULTS, base_epochs=3,
                  forced=scenario, **overrides)


def _imbalanced(seed: int = 0, n_major: int = 180, n_minor: int = 20):
    """Two overlapping Gaussian classes: train and val n_major:n_minor, and a balanced test set."""
    g = np.random.default_rng(seed)

    def draw(n0, n1):
        x = np.concatenate([g.normal(-0.5, 1.0, (n0, 4)), g.normal(0.5, 1.0, (n1, 4))]).astype(np.float32)
        return x, np.array([0] * n0 + [1] * n1)

    return (*draw(n_major, n_minor), *draw(n_major, n_minor), draw(100, 100)[0])


def _fit(xt, yt, xv, yv, weight_decays=(0.0,), epochs=30, **options):
    """A head on train alone (its weight decay and epochs cross-validated on train); xv, yv are not given to it."""
    factory = lambda groups, module: make_optimizer_factory(TrainConfig(), [{**g, "lr": 0.05} for g in groups])(module)
    return fit_linear_head([xt[None]], yt, np.ones(len(yt), bool), 2, list(weight_decays), epochs, 32, factory,
                           seed=0, **options)


def _minority_share(result, xv) -> float:
    logits = torch.from_numpy(xv) @ result.weight.T + result.bias
    return float((logits.argmax(1) == 1).float().mean())


def test_class_weights_and_balanced_sampling_move_an_imbalanced_head_toward_the_minority():
    xt, yt, xv, yv, test = _imbalanced()
    plain = _minority_share(_fit(xt, yt, xv, yv), test)
    weighted = _minority_share(_fit(xt, yt, xv, yv, class_weights=class_weights(list(yt), 2)), test)
    balanced = _minority_share(_fit(xt, yt, xv, yv, balanced=True), test)
    # Trained on 9:1 data the plain head seldom says "minority" on a balanced test set (0.23 measured);
    # weighted or balanced it says so nearly as often as the set has it (0.44, 0.43 of a half).
    assert plain < 0.3
    assert weighted > plain + 0.15 and balanced > plain + 0.15


def test_balanced_sampler_is_the_heads_loader_and_draws_classes_equally(monkeypatch):
    seen = []
    original = linear_probe.head_train_loader

    def spy(*args, **kwargs):
        loader = original(*args, **kwargs)
        seen.append(loader)
        return loader

    monkeypatch.setattr(linear_probe, "head_train_loader", spy)
    xt, yt, xv, yv, _ = _imbalanced()
    _fit(xt, yt, xv, yv, epochs=1)
    plain, seen[:] = list(seen), []
    _fit(xt, yt, xv, yv, epochs=1, balanced=True)
    # Every head of the search (each cross-validation fold, and the refit on all rows) draws the same way.
    assert plain and all(isinstance(loader.sampler, RandomSampler) for loader in plain)
    assert seen and all(isinstance(loader.sampler, WeightedRandomSampler) for loader in seen)
    drawn = torch.cat([y for _, y in seen[-1]] + [y for _ in range(20) for _, y in seen[-1]])
    assert abs(float(drawn.float().mean()) - 0.5) < 0.05  # the 1-in-10 class drawn half the time


def test_label_smoothing_is_in_the_heads_training_loss():
    module = linear_probe.HeadSearch(4, 3, [0.0], lambda groups, m: None, label_smoothing=0.2)
    logits, y = torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([0])
    assert float(module.train_loss(logits, y)) > float(torch.nn.functional.cross_entropy(logits, y)) + 0.1
    # A smoothed loss is smallest at finite logits: the trained head is less sure than the plain one.
    xt, yt, xv, yv, _ = _imbalanced(n_major=100, n_minor=100)
    xt[:, 0] += np.where(yt == 1, 4.0, -4.0)  # separable: without smoothing the logits keep growing
    sure = [float(torch.softmax(torch.from_numpy(xv) @ r.weight.T + r.bias, 1).max(1).values.mean())
            for r in (_fit(xt, yt, xv, yv), _fit(xt, yt, xv, yv, label_smoothing=0.3))]
    assert sure[1] < sure[0] - 0.02


def test_explicit_weight_decay_replaces_the_feature_plans_grid():
    assert len(_plan("small-similar").weight_decay_grid) > 1
    plan = _plan("small-different", weight_decay=0.3)
    assert plan.weight_decay_grid == [0.3] and any("weight decay 0.3 (--weight-decay)" in r for r in plan.reasons)
    # Fine-tuning plans take it through the recipe; their head warm-up keeps the grid.
    assert _plan("large-similar", weight_decay=0.3).weight_decay_grid == _plan("large-similar").weight_decay_grid
    assert resolve_recipe(TrainConfig(weight_decay=0.3), "large-similar").weight_decay == 0.3
    assert resolve_recipe(TrainConfig(), "large-similar").weight_decay == 0.05  # not given: unchanged default
    xt, yt, xv, yv, _ = _imbalanced()
    assert len(_fit(xt, yt, xv, yv, weight_decays=plan.weight_decay_grid, epochs=2).candidates) == 1


def test_a_small_similar_run_honours_weight_decay_class_weights_sampler_and_smoothing(image_folder: Path,
                                                                                       tmp_path: Path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, tiny_train_args(
        image_folder, out, "--scenario", "small-similar", "--weight-decay", "0.2", "--class-weights", "auto",
        "--sampler", "balanced", "--label-smoothing", "0.1"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["weight_decay_grid"] == [0.2] and summary["plan"]["weight_decay"] == 0.2
    assert [c["weight_decay"] for c in summary["plan"]["head_search"]] == [0.2]
    recipe = summary["recipe"]
    assert (recipe["class_weights"], recipe["sampler"], recipe["label_smoothing"]) == ("auto", "balanced", 0.1)


VALUES = {"augment": "strong", "schedule": "step", "mixup": "0.2", "cutmix": "0.2", "warmup_epochs": "1",
          "step_epochs": "2", "lr_gamma": "0.5", "ema": "0.9", "patience": "2", "dropout": "0.1",
          "drop_path": "0.1", "drop_connect": "0.1"}


@pytest.mark.parametrize("name", NOT_ON_FEATURES)
def test_each_option_a_feature_plan_ignores_is_refused(image_folder: Path, tmp_path: Path, name: str):
    flag = "--" + name.replace("_", "-")
    result = CliRunner().invoke(cli, tiny_train_args(image_folder, tmp_path / "out", "--scenario", "small-similar",
                                                     flag, VALUES[name]))
    assert result.exit_code == 2 and "Traceback" not in result.output  # a UserError: one line, no traceback
    message = result.output.strip()
    assert message.startswith(f"Error: {flag}:") and "feature plan" in message
    assert "--scenario large-similar" in message and "large-different" in message
    assert not (tmp_path / "out").exists()  # refused before any work


def test_refusal_names_every_ignored_option_and_defaults_pass():
    cfg = TrainConfig(mixup=0.0, ema=0.0, augment="light", label_smoothing=0.1, class_weights="auto")
    with pytest.raises(UserError, match=r"^--augment, --mixup, --ema: the plan small-different is a feature plan"):
        check_feature_plan_options(cfg, "small-different")
    check_feature_plan_options(TrainConfig(label_smoothing=0.1, weight_decay=0.1, sampler="balanced",
                                           class_weights="auto", optimizer="sgd"), "small-similar")


def test_a_measured_feature_plan_is_not_piloted_with_options_it_would_refuse(image_folder: Path, tmp_path: Path):
    """A 'pretrained' file on 12 images measures a small-* cell, and the pilot (little data) compares the two
    linear heads; with --ema, which a feature plan refuses, neither runs (the pilot says why) and the network is
    fine-tuned, which honours --ema."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=10).state_dict().items()},
              str(weights))
    args = tiny_train_args(image_folder, tmp_path / "out", "--ema", "0.9")
    args[args.index("--weights") + 1] = str(weights)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["scenario"].startswith("large-") and summary["recipe"]["ema"] == 0.9
    reasons = " ".join(summary["plan"]["reasons"])
    assert "pilot" in reasons and "small-" in reasons and "no linear head could run" in reasons


def test_sweep_space_per_plan():
    for scenario in ("small-similar", "small-different"):
        plan = _plan(scenario)
        assert set(search_space(plan)) == {"lr"}
        with pytest.raises(UserError, match="--search-augment: the plan .* is a feature plan"):
            search_space(plan, search_augment=True)
        with pytest.raises(UserError, match="--wd-range: the plan"):
            search_space(plan, wd_range=(1e-4, 1e-2))
    for scenario in ("large-similar", "large-different"):
        plan = _plan(scenario)
        assert search_space(plan) == {"lr": ("log", 1e-5, 1e-1), "weight_decay": ("log", 1e-6, 1e-1)}
        space = search_space(plan, (1e-4, 1e-2), (1e-3, 1e-2), search_augment=True)
        assert space["weight_decay"] == ("log", 1e-3, 1e-2) and "strong" in space["augment"][1]
    assert set(search_space(dataclasses.replace(_plan("small-similar"), train_on_features=False))) == {
        "lr", "weight_decay"}


def test_sweep_refuses_augment_search_for_a_feature_plan(image_folder: Path, tmp_path: Path):
    result = CliRunner().invoke(cli, ["sweep", str(image_folder), "--trials", "1", "--model", "test_resnet",
                                      "--weights", "none", "--scenario", "small-similar", "--image-size", "32",
                                      "--num-workers", "0", "--batch-size", "4", "--search-augment",
                                      "--output", str(tmp_path / "sweep")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--search-augment: the plan small-similar is a feature plan" in result.output


def test_select_fraction_acts_on_a_network_plan_and_is_refused_by_a_feature_plan(image_folder: Path, tmp_path: Path):
    refused = CliRunner().invoke(cli, tiny_train_args(image_folder, tmp_path / "a", "--scenario", "small-similar",
                                                      "--select-fraction", "0.3"))
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "--select-fraction: the plan small-similar is a feature plan" in refused.output
    out = tmp_path / "b"
    result = CliRunner().invoke(cli, tiny_train_args(image_folder, out, "--scenario", "large-similar",
                                                     "--select-fraction", "0.5"))
    assert result.exit_code == 0, result.output
    selection = json.loads((out / "summary.json").read_text())["selection"]
    # 12 training images, 6 per class: half of each class held out.
    assert (selection["images"], selection["fit_images"]) == (6, 6) and "--select-fraction 0.5" in selection["protocol"]
