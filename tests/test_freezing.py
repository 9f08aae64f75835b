"""Freezing really freezes: for every plan and several timm families, after real training steps the
frozen parameters are unchanged (and got no gradient), frozen BatchNorm statistics are unchanged,
and the layers meant to learn did."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.model.backbone import create_backbone
from finetune.config import TrainConfig
from finetune.training.freezing import FreezeCallback, apply_plan
from finetune.strategy.groups import layer_groups, plan_groups
from finetune.training.module import Classifier
from finetune.training.optim import make_optimizer_factory
from finetune.strategy.decide import SCENARIO_NAMES, Thresholds, decide, load_scenario_defaults

FAMILIES = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"]
DEFAULTS = {name: load_scenario_defaults(name) for name in SCENARIO_NAMES}


def _plan(scenario: str, **overrides):
    sim = {"score": 0.9, "components": {}, "best_stage": "final", "best_earlier_stage": "stage1", "probes": []}
    return decide({"n_train": 5000, "per_class_median": 500}, sim, Thresholds(), DEFAULTS, base_epochs=1,
                  forced=scenario, **overrides)


def _fit(model: nn.Module, param_groups, callback: FreezeCallback, epochs: int = 1) -> pl.Trainer:
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32) * 2 + 0.5, torch.randint(0, 3, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module = Classifier(model, 3, make_optimizer_factory(TrainConfig(lr=1e-2, weight_decay=0.05), param_groups))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[callback])
    trainer.fit(module, loader, loader)  # validation too: Lightning sets train() again after it
    return trainer


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{b}": getattr(m, b).clone() for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in ("running_mean", "running_var")}


@pytest.mark.parametrize("model_name", FAMILIES)
@pytest.mark.parametrize("scenario, overrides", [("large-similar", {}), ("large-different", {}),
                                                 ("large-different", {"freeze_groups": 2})])
@pytest.mark.parametrize("bn_policy", ["eval", "train"])
def test_network_plans_freeze_what_they_say(model_name: str, scenario: str, overrides: dict, bn_policy: str):
    torch.manual_seed(0)
    model = create_backbone(model_name, "none", 3, image_size=32).model
    plan = _plan(scenario, **overrides)
    settings = plan_groups(model, plan, head_lr=1e-2)
    groups = layer_groups(model)
    frozen = [g for g, s in zip(groups, settings) if s.frozen]
    learning = [g for g, s in zip(groups, settings) if not s.frozen]
    if overrides:
        assert [g.index for g in frozen] == [0, 1]
    else:
        assert not frozen  # with a lot of data both large plans fine-tune every group
    lrs = [s.lr for s in settings if not s.frozen]
    assert lrs == sorted(lrs) and lrs[-1] == 1e-2  # lower LR for lower (more pretrained) groups
    assert lrs[-2] == pytest.approx(1e-2 * plan.backbone_lr_mult)

    before = copy.deepcopy(model.state_dict())
    bn_before = _bn_stats(model)
    param_groups, callback = apply_plan(model, settings, bn_policy)
    assert {g["name"] for g in param_groups} == {g.name for g in learning}
    _fit(model, param_groups, callback)

    params = dict(model.named_parameters())
    for g in frozen:
        for n in g.param_names:
            assert params[n].grad is None, n
            assert torch.equal(params[n].detach(), before[n]), f"frozen {n} changed"
        for m in g.bn_modules:
            for b in ("running_mean", "running_var"):
                assert torch.equal(_bn_stats(model)[f"{m}.{b}"], bn_before[f"{m}.{b}"]), f"frozen BN {m} moved"
    for g in learning:
        assert any(not torch.equal(params[n].detach(), before[n]) for n in g.param_names), f"{g.name} did not learn"
    moved = {m for g in learning for m in g.bn_modules
             if not torch.equal(_bn_stats(model)[f"{m}.running_mean"], bn_before[f"{m}.running_mean"])}
    learning_bn = {m for g in learning for m in g.bn_modules}
    # "eval": pretrained statistics kept where layers learn too; "train": plain BatchNorm re-estimates them.
    assert moved == (set() if bn_policy == "eval" else learning_bn)
    if learning_bn:  # BatchNorm weights learn with their group, whatever the policy
        assert any(not torch.equal(params[f"{m}.weight"].detach(), before[f"{m}.weight"]) for m in learning_bn)
