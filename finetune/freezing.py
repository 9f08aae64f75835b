"""Applying a plan to a network: which layer groups learn, how fast, and BatchNorm of frozen layers.

Layer groups come from the model's own timm `group_matcher(coarse=True)` (stem, each stage or
block, then the head), so the same code freezes ResNets, ConvNeXts, EfficientNets/MobileNets and
ViTs. Groups are counted from the bottom; the last group holds the classifier and always learns.

Frozen groups get ``requires_grad=False`` once, before training, and stay out of the optimizer;
their BatchNorm layers are kept in eval mode (running statistics unchanged) by `FreezeCallback`, and
so are those of pretrained groups that learn (see `FreezeCallback` for why).

Groups are frozen before training and never change during it: flipping ``requires_grad`` in the
middle of training lets DDP ranks drift apart (Lightning issue #20340).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from timm.models import group_parameters
from torch import nn

from finetune.strategy import BN_POLICIES, Plan, resolve_frozen_count

log = logging.getLogger(__name__)


@dataclass
class LayerGroup:
    index: int
    name: str
    param_names: list[str]
    bn_modules: list[str]
    is_head: bool


def _common_prefix(names: list[str]) -> str:
    paths = [n.split(".")[:-1] for n in names]  # module paths, without the tensor name
    return ".".join(os.path.commonprefix(paths))


def _group_name(names: list[str]) -> str:
    """A readable name for a group: the common module path of each top-level module in it."""
    by_top: dict[str, list[str]] = {}
    for n in names:
        by_top.setdefault(n.split(".")[0], []).append(n)
    parts = [_common_prefix(members) or top for top, members in by_top.items()]
    return "+".join(parts[:4]) + ("+..." if len(parts) > 4 else "")


def _bn_group_key(name: str, module: nn.Module, to_group: dict[str, int]) -> str | None:
    """The parameter whose group a BatchNorm layer belongs to: its own weight, or (no affine
    parameters) the first parameter of the closest enclosing module that has one."""
    if f"{name}.weight" in to_group:
        return f"{name}.weight"
    prefix = name
    while prefix:
        prefix = prefix.rpartition(".")[0]
        owned = [n for n in to_group if n.startswith(f"{prefix}.") or not prefix]
        if owned:
            return owned[0]
    return None


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's coarse layer groups, bottom to top, with their parameters and BatchNorm layers."""
    to_group = group_parameters(model, model.group_matcher(coarse=True), reverse=True)  # param name -> group
    bn_names = {name: _bn_group_key(name, m, to_group) for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    head = model.get_classifier()
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    head_names = {n for n, p in model.named_parameters() if id(p) in head_ids}
    n_groups = max(to_group.values()) + 1
    groups = [LayerGroup(i, "", [], [], False) for i in range(n_groups)]
    for n, p in model.named_parameters():
        groups[to_group[n]].param_names.append(n)
    for module_name, key in bn_names.items():
        if key is not None:
            groups[to_group[key]].bn_modules.append(module_name)
    groups = [g for g in groups if g.param_names]
    for i, g in enumerate(groups):
        g.index = i
        g.name = _group_name(g.param_names)
        g.is_head = bool(head_names & set(g.param_names))
    if head_names:
        # The classifier must sit in the top group alone with whatever follows the backbone.
        assert groups[-1].is_head and not any(g.is_head for g in groups[:-1]), "classifier not in the last group"
    return groups


@dataclass
class GroupSetting:
    name: str
    index: int
    lr: float
    frozen: bool  # never learns in this run


def plan_groups(model: nn.Module, plan: Plan, head_lr: float) -> list[GroupSetting]:
    """Resolve the plan against the model: frozen or not, and the LR of every group."""
    groups = layer_groups(model)
    backbone = [g for g in groups if not g.is_head]
    n_frozen = resolve_frozen_count(plan, len(backbone))
    settings = []
    for g in backbone:
        depth_from_top = len(backbone) - 1 - g.index
        lr = head_lr * plan.backbone_lr_mult * plan.layer_decay ** depth_from_top
        frozen = g.index < n_frozen or lr <= 0
        settings.append(GroupSetting(g.name, g.index, 0.0 if frozen else lr, frozen))
    settings += [GroupSetting(g.name, g.index, head_lr, False) for g in groups if g.is_head]
    return settings


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
