"""Applying a plan's layer groups to a network: requires_grad, per-group LRs, BatchNorm modes."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from torch import nn

from finetune.strategy.decide import BN_POLICIES
from finetune.strategy.groups import GroupSetting, layer_groups

log = logging.getLogger(__name__)


def apply_plan(model: nn.Module, settings: list[GroupSetting],
               bn_policy: str = "eval") -> tuple[list[dict[str, Any]], "FreezeCallback"]:
    """Set requires_grad, build the optimizer's param groups, and the callback that enforces the rest.

    `bn_policy` "eval" keeps every BatchNorm layer in inference mode, learning or not: its running
    statistics stay the pretrained ones and only its affine weights learn. "train" is plain
    BatchNorm for the groups that learn (frozen groups stay in eval mode either way).

    Returns torch-style groups ``{"params", "lr", "name"}`` for `make_optimizer_factory`.
    """
    if bn_policy not in BN_POLICIES:
        raise ValueError(f"bn_policy must be one of {tuple(BN_POLICIES)}, got {bn_policy!r}")
    groups = layer_groups(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    param_groups: list[dict[str, Any]] = []
    eval_bn: list[nn.Module] = []
    for g, s in zip(groups, settings):
        assert g.index == s.index
        group_params = [params[n] for n in g.param_names]
        for p in group_params:
            p.requires_grad_(not s.frozen)
        if s.frozen or bn_policy == "eval":
            eval_bn.extend(modules[m] for m in g.bn_modules)
        if not s.frozen:
            param_groups.append({"params": group_params, "lr": s.lr, "name": g.name})
    if len({g["lr"] for g in param_groups}) == 1:
        # One LR for everything that learns (from random init, or a naive baseline): one group.
        param_groups = [{"params": [p for g in param_groups for p in g["params"]], "lr": param_groups[0]["lr"],
                         "name": "all"}]
    n_frozen = sum(1 for s in settings if s.frozen)
    log.info("Layer groups: %d frozen, %d learning; %s", n_frozen, len(settings) - n_frozen, BN_POLICIES[bn_policy])
    return param_groups, FreezeCallback(eval_bn)


class FreezeCallback(pl.Callback):
    """Keeps BatchNorm layers in their policy's mode: Lightning switches the whole module to train
    mode at the start of training and after every validation, so the policy is re-applied at the
    start of every training batch (a few dozen `.eval()` calls).

    Why pretrained BatchNorm stays in eval mode even where layers learn (Keras' transfer-learning
    advice): the head is warmed up on features computed in eval mode, and in train mode the same
    network computes different features (batch statistics instead of the pretrained ones). In eval
    mode the first step computes exactly what the head was fitted to (docs/decisions.md).
    """

    def __init__(self, eval_bn: list[nn.Module]):
        self.eval_bn = eval_bn

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for m in self.eval_bn:
            m.eval()
