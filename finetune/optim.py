"""Optimizers for the parameter groups a plan hands over (each group has its own learning rate)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from finetune.config import TrainConfig


def make_optimizer_factory(cfg: TrainConfig, param_groups: list[dict[str, Any]]) -> Callable[[nn.Module], Any]:
    """A callable for `Classifier(optimizer_factory=...)`: returns what configure_optimizers returns.

    Args:
        cfg: the training config (optimizer options).
        param_groups: torch-style groups, each ``{"params": [...], "lr": float, "name": str}``.
    """

    def factory(net: nn.Module) -> Any:
        groups = [g for g in param_groups if any(p.requires_grad for p in g["params"])]
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    return factory
