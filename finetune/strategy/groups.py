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

from timm.models import group_parameters
from torch import nn

from finetune.strategy.decide import Plan, resolve_frozen_count

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


