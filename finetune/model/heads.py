"""Linear heads on frozen features: the network for a head on an earlier stage, and training a head
on cached features (the small-data plans, and the head warm-up of the large-data plans).

The head trains on standardised features (better conditioned), then the standardisation is folded
into the linear layer, so the saved network takes raw backbone features like any timm classifier.
Several weight-decay candidates train side by side in one pass over the data (one Lightning fit);
the one with the best validation accuracy (then loss) at its best epoch is kept.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import UserError


log = logging.getLogger(__name__)


class StageClassifier(nn.Module):
    """A timm model cut after one stage, its pooled features, and a linear classifier.

    The trunk is pruned with timm's `prune_intermediate_layers`, so the later stages are neither
    run nor saved; features come from `forward_intermediates`, exactly as the feature cache got them.
    """

    def __init__(self, model: nn.Module, stage_index: int, num_classes: int):
        super().__init__()
        channels = int(model.feature_info[stage_index]["num_chs"])
        model.prune_intermediate_layers(indices=[stage_index], prune_head=True)
        self.trunk = model
        self.stage_index = stage_index
        self.head = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.trunk.forward_intermediates(x, indices=[self.stage_index], intermediates_only=True)[-1]
        return feats.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def load_linear(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a trained linear head into a classifier layer (Linear, or a 1x1 conv classifier)."""
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        layer.bias.copy_(bias)


# --- training on cached features -----------------------------------------------------------------


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
