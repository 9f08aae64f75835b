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
from torch import nn


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


