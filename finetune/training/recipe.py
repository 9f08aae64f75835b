"""The training recipe: per-scenario defaults, and the small pieces train.py wires in around the model.

A recipe is what the lecture notes on training neural networks recommend for one of the four
scenarios (augmentation, mixup, label smoothing, schedule, regularization, weight averaging). Every
field can be overridden from the CLI or the YAML config; `None` in the config means "use the default".
Optimizers and schedules are built in `finetune.training.optim`, augmentation in `finetune.data.transforms`, the
callbacks (EMA, divergence, train/val gap) in `finetune.training.callbacks`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from finetune.config import SCENARIOS, TrainConfig
from finetune.errors import UserError


@dataclass(frozen=True)
class Recipe:
    """Resolved recipe values (no `None` left)."""

    augment: str
    mixup: float
    cutmix: float
    label_smoothing: float
    schedule: str
    warmup_epochs: float
    dropout: float
    drop_path: float
    drop_connect: float
    ema: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_BASE = dict(mixup=0.0, cutmix=0.0, label_smoothing=0.0, schedule="cosine", warmup_epochs=0.0,
             dropout=0.0, drop_path=0.0, drop_connect=0.0, ema=0.0)

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
        if given is not None:
            values[f.name] = given
    return Recipe(**values)


def model_kwargs(recipe: Recipe) -> dict[str, Any]:
    """timm create args for head dropout and stochastic depth (only when used: not every model takes both)."""
    kwargs: dict[str, Any] = {}
    if recipe.dropout:
        kwargs["drop_rate"] = recipe.dropout
    if recipe.drop_path:
        kwargs["drop_path_rate"] = recipe.drop_path
    return kwargs


class DropConnectLinear(nn.Linear):
    """A linear layer that drops individual *weights* (not activations) while training.

    DropConnect (Wan et al. 2013) zeroes each weight with probability p and rescales the rest by
    1/(1-p), so evaluation uses the plain weights. Same parameter names as `nn.Linear`, so a saved
    state_dict loads into the ordinary timm head.
    """

    def __init__(self, in_features: int, out_features: int, p: float, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return super().forward(x)
        mask = torch.empty_like(self.weight).bernoulli_(1.0 - self.p)
        return F.linear(x, self.weight * mask / (1.0 - self.p), self.bias)


def _classifier_path(model: nn.Module) -> str | None:
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(name, (list, tuple)):  # distilled models have two heads; the first is the class head
        name = name[0]
    return name or None


def init_head(model: nn.Module, drop_connect: float = 0.0) -> nn.Module | None:
    """Give a timm model a freshly initialised classifier, optionally with DropConnect.

    The head is always re-initialised: the user's classes do not correspond to the rows of any
    source head. Xavier/Glorot (uniform), bias zero: the head is a linear layer feeding softmax with no
    ReLU after it, so He's factor 2 (which compensates ReLU halving the variance) does not apply, and
    Xavier keeps the logits' variance near the features' so the initial loss sits near ln(C).
    Returns the head, or None when the model has no linear classifier to initialise.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        return None
    if drop_connect:
        path = _classifier_path(model)
        if path is None:
            raise UserError(f"--drop-connect needs a model whose classifier timm names; "
                            f"{type(model).__name__} does not. Use --drop-connect 0.")
        new = DropConnectLinear(head.in_features, head.out_features, drop_connect, bias=head.bias is not None)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, new.to(head.weight.device))
        head = new
    nn.init.xavier_uniform_(head.weight)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return head


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (C * n_c) (scikit-learn's "balanced"), mean 1 over samples."""
    present = sorted(set(labels))
    weights = compute_class_weight("balanced", classes=torch.tensor(present).numpy(), y=list(labels))
    full = torch.ones(num_classes)
    full[present] = torch.tensor(weights, dtype=torch.float32)
    return full


