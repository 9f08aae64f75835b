"""The training recipe: per-scenario defaults, and the small pieces train.py wires in around the model.

A recipe is what the lecture notes on training neural networks recommend for one of the four
scenarios (augmentation, mixup, label smoothing, schedule, regularization, weight averaging). Every
field can be overridden from the CLI or the YAML config; `None` in the config means "use the default".
Optimizers and schedules are built in `finetune.training.optim`, augmentation in `finetune.data.transforms`, the
callbacks (EMA, divergence, train/val gap) in `finetune.training.callbacks`.
"""

from __future__ import annotations

from dataclasses import asdict, fields, make_dataclass
from typing import Any, Sequence, get_type_hints

import torch
from sklearn.utils.class_weight import compute_class_weight

from finetune.config import SCENARIOS, TrainConfig, options
from finetune.data.multilabel import label_matrix
from finetune.errors import UserError


def _recipe_class() -> type:
    """`Recipe`: every option of the config's "Recipe" group, resolved (the scenario's defaults, then the config).

    Generated from `TrainConfig`'s declarations, so an option is declared once. The training steps (optimizer,
    schedule, loss, sampler, callbacks) read this, not the whole config. `None` is left only where it means
    "derived" (momentum, step_epochs, lr_gamma) or "off" (patience).
    """
    hints = get_type_hints(TrainConfig)
    cls = make_dataclass("Recipe", [(f.name, hints[f.name]) for f in options() if f.metadata["group"] == "Recipe"],
                         frozen=True, namespace={"to_dict": lambda self: asdict(self)})
    cls.__module__, cls.__doc__ = __name__, _recipe_class.__doc__
    return cls


Recipe = _recipe_class()


# Weight decay of a fine-tuning plan's optimizer. A feature plan's head chooses its own by cross-validation on
# train from the plan's weight_decay_grid unless --weight-decay is given (then the grid is that one value: decide()).
NETWORK_WEIGHT_DECAY = 0.05
_BASE = dict(weight_decay=NETWORK_WEIGHT_DECAY, mixup=0.0, cutmix=0.0, label_smoothing=0.0, schedule="cosine",
             warmup_epochs=0.0, dropout=0.0, drop_path=0.0, drop_connect=0.0, ema=0.0)

# Little data: gentle augmentation only; the backbone is (mostly) frozen, so there is little to
# regularize and a weight average of a linear head buys nothing. Much data: label smoothing,
# stochastic depth and an EMA of the weights, since the network moves; a different domain moves all
# of it, so head dropout and more stochastic depth too. Not by default: RandAugment (`strong`) and
# mixup/cutmix, which pay off over schedules of tens of epochs (docs/decisions.md).
DEFAULT_RECIPES: dict[str, dict[str, Any]] = {
    "small-similar": {**_BASE, "augment": "light"},
    "small-different": {**_BASE, "augment": "light"},
    "large-similar": {**_BASE, "augment": "standard", "label_smoothing": 0.1, "warmup_epochs": 0.5,
                      "drop_path": 0.05, "ema": 0.999},
    "large-different": {**_BASE, "augment": "light", "label_smoothing": 0.1, "warmup_epochs": 1.0,
                        "dropout": 0.2, "drop_path": 0.1, "ema": 0.9998},
}


def default_recipe(scenario: str) -> dict[str, Any]:
    """The recipe defaults of one scenario of the four-scenario table."""
    if scenario not in DEFAULT_RECIPES:
        valid = ", ".join(s for s in SCENARIOS if s != "auto")
        raise UserError(f"No default recipe for scenario {scenario!r}. Valid scenarios: {valid}.")
    return dict(DEFAULT_RECIPES[scenario])


def resolve_recipe(cfg: TrainConfig, scenario: str) -> Recipe:
    """Scenario defaults, overridden by every recipe value the config sets explicitly."""
    values = default_recipe(scenario)
    for f in fields(Recipe):
        given = getattr(cfg, f.name)
        if given is not None or f.name not in values:
            values[f.name] = given
    recipe = Recipe(**values)
    _check_schedule_options(recipe)
    return recipe


def _check_schedule_options(recipe: Recipe) -> None:
    """Refuse schedule options the resolved schedule ignores."""
    if recipe.step_epochs is not None and recipe.schedule != "step":
        raise UserError(f"--step-epochs applies to --schedule step; this run's schedule is {recipe.schedule}. "
                        "Leave it out, or pass --schedule step.")
    if recipe.lr_gamma is not None and recipe.schedule not in ("step", "exponential"):
        raise UserError(f"--lr-gamma applies to --schedule step or exponential; this run's schedule is "
                        f"{recipe.schedule}. Leave it out, or pass one of those schedules.")


def model_kwargs(recipe: Recipe) -> dict[str, Any]:
    """timm create args for head dropout and stochastic depth (only when used: not every model takes both)."""
    kwargs: dict[str, Any] = {}
    if recipe.dropout:
        kwargs["drop_rate"] = recipe.dropout
    if recipe.drop_path:
        kwargs["drop_path_rate"] = recipe.drop_path
    return kwargs


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (C * n_c) (scikit-learn's "balanced"), mean 1 over samples."""
    present = sorted(set(labels))
    weights = compute_class_weight("balanced", classes=torch.tensor(present).numpy(), y=list(labels))
    full = torch.ones(num_classes)
    full[present] = torch.tensor(weights, dtype=torch.float32)
    return full


def positive_weights(label_sets: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """Multi-label `--class-weights auto`: each class's positives weighed by its negatives / positives (BCE's
    pos_weight), so a rare class counts as much as a common one; 1 for a class with no positive."""
    positives = torch.from_numpy(label_matrix(label_sets, num_classes).sum(0)).float()
    negatives = len(label_sets) - positives
    return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones(num_classes))


# Recipe options with nothing to act on in a feature plan (a linear head on frozen, cached features):
# no images are augmented or mixed per step, no network to regularise, a fixed-LR fit of a few epochs
# whose best epoch per candidate is kept. What does act there: --lr, --optimizer/--momentum/--nesterov,
# --weight-decay (one value instead of the plan's grid), --class-weights, --sampler, --label-smoothing.
NOT_ON_FEATURES = ("augment", "mixup", "cutmix", "schedule", "warmup_epochs", "step_epochs", "lr_gamma", "ema",
                   "patience", "dropout", "drop_path", "drop_connect")


def check_feature_plan_options(cfg: TrainConfig, scenario: str) -> None:
    """Refuse, in one message, the recipe options a feature plan would ignore; options left unset (None) are fine."""
    given = [name for name in NOT_ON_FEATURES if getattr(cfg, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(f"{flags}: the plan {scenario} is a feature plan (a linear head on frozen, cached features), "
                        f"which ignores {'this option' if len(given) == 1 else 'these options'}. Leave "
                        f"{'it' if len(given) == 1 else 'them'} out, or force a fine-tuning plan with "
                        "--scenario large-similar or --scenario large-different.")


def check_selection_option(cfg: TrainConfig, scenario: str, piloted: bool) -> None:
    """--select-fraction acts on a fine-tuning plan and on the pilot; a feature plan that was not piloted
    chooses by cross-validation and holds no selection split: refuse it there rather than ignore it."""
    if cfg.select_fraction is not None and not piloted:
        raise UserError(f"--select-fraction: the plan {scenario} is a feature plan, which chooses its head by "
                        "cross-validation on train and holds no selection split. Leave it out, or force a "
                        "fine-tuning plan with --scenario large-similar or --scenario large-different.")
