"""What a trained network gives at inference: its logits and the features its classifier reads.

The features (the classifier layer's input: pooled pre-logits of a timm model, or the pooled stage
features of a head on an earlier stage) are what the unknown-image score measures distances in. They
are captured with a forward hook on the classifier, so the logits are exactly the network's own and
any timm architecture works without knowing how its head is built. The same module is what the ONNX
export traces: its graph has the outputs ``logits`` and ``features``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from finetune.errors import UserError


def classifier_of(net: nn.Module) -> nn.Module:
    """The layer that maps features to class logits: a StageClassifier's head, or timm's classifier."""
    head = getattr(net, "head", None)
    if hasattr(net, "stage_index") and isinstance(head, nn.Module):  # finetune.model.heads.StageClassifier
        return head
    layer = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not isinstance(layer, nn.Module) or not any(True for _ in layer.parameters()):
        raise UserError(f"{type(net).__name__} has no classifier layer whose input could be read as features.")
    return layer


class LogitsAndFeatures(nn.Module):
    """``net(x) -> (logits [N, K], features [N, C])``; the features are the classifier layer's input."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.classifier = classifier_of(net)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        hook = self.classifier.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
        try:
            logits = self.net(x)
        finally:
            hook.remove()
        return logits, seen[-1].flatten(1)


@dataclass
class Outputs:
    """A network's outputs on N images: logits ``[N, V, K]`` (V crops), features ``[N, V, C]`` (or pooled to
    ``[N, 1, C]``: the centre crop's, normalised), one error per image ("" when fine; failed images have NaN
    rows)."""

    logits: torch.Tensor
    features: torch.Tensor
    errors: list[str] = field(default_factory=list)
