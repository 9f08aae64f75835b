"""The learning-rate range test of `finetune lr-find`, on the decided plan's head or network."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.tuner import Tuner
from torch import nn

from finetune import runtime
from finetune.config import TrainConfig
from finetune.data.folders import FolderSplits
from finetune.model.backbone import Backbone
from finetune.strategy.decide import Plan
from finetune.strategy.measure import Decision
from finetune.training.feature_plans import head_options, head_inputs, head_optimizer
from finetune.training.linear_probe import HeadSearch, head_data
from finetune.training.lr_range import hold_lr_ratios
from finetune.training.network_plans import prepare_network, network_datamodule, network_classifier
from finetune.training.recipe import Recipe


@dataclass
class RangeTest:
    """An LR range test: the head LR grows exponentially from min_lr to max_lr over num_training steps."""

    min_lr: float
    max_lr: float
    num_training: int
    root: Path  # Lightning's scratch checkpoint (the weights it restores afterwards) goes here


def lr_range_test(cfg: TrainConfig, decision: Decision, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
                  rt: runtime.Runtime, test: RangeTest) -> tuple[Any, dict[str, Any]]:
    """Lightning's LR range test of what the plan trains, the LR varied being the head's (train's --lr).

    A feature plan: its head search (every weight decay of the grid) on the same cached, standardised
    features as `train`, in seconds. A network plan: after the same head warm-up, the Classifier with the
    plan's frozen groups and per-group LRs, which keep their ratios to the head LR. Returns Lightning's
    finder (its `results` hold the curve) and what was measured.
    """
    if decision.plan.train_on_features:
        return _head_range_test(cfg, decision.plan, recipe, backbone, splits, rt, test)
    return _network_range_test(cfg, decision, recipe, backbone, splits, rt, test)


def _range_trainer(rt: runtime.Runtime, test: RangeTest, batches_per_epoch: int, progress: bool) -> pl.Trainer:
    return pl.Trainer(accelerator=rt.accelerator, devices=rt.lightning_devices, precision=rt.precision,
                      max_epochs=math.ceil(test.num_training / max(1, batches_per_epoch)) + 1, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                      num_sanity_val_steps=0, default_root_dir=test.root)


def _find(trainer: pl.Trainer, module: pl.LightningModule, test: RangeTest, **data: Any) -> Any:
    return Tuner(trainer).lr_find(module, min_lr=test.min_lr, max_lr=test.max_lr, num_training=test.num_training,
                                  update_attr=False, **data)


def _head_range_test(cfg: TrainConfig, plan: Plan, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
                     rt: runtime.Runtime, test: RangeTest) -> tuple[Any, dict[str, Any]]:
    views, train, head_rt = head_inputs(cfg, backbone, splits.train, plan, plan.head_stage, plan.aug_views, rt)
    options = head_options(recipe, splits)
    data = head_data(views, train.labels, np.flatnonzero(train.valid), None, len(splits.classes), cfg.batch_size,
                     cfg.seed, options["balanced"])
    module = HeadSearch(data.in_features, len(splits.classes), plan.weight_decay_grid, head_optimizer(recipe),
                        options["class_weights"], options["label_smoothing"])
    finder = _find(_range_trainer(head_rt, test, len(data.train), progress=False), module, test,
                   train_dataloaders=data.train)
    return finder, {"trains": "linear head on cached features",
                    "measured": f"the linear head on cached {plan.head_stage} features ({data.in_features} channels, "
                                f"standardised as train does), one head per weight decay {list(plan.weight_decay_grid)}"
                                ", all at the same LR",
                    "lr_of": "every head (train's --lr)"}


def _network_range_test(cfg: TrainConfig, decision: Decision, recipe: Recipe, backbone: Backbone,
                        splits: FolderSplits, rt: runtime.Runtime, test: RangeTest) -> tuple[Any, dict[str, Any]]:
    # The same cut of train as `train` makes (Lightning's finder validates too): val is not read.
    train = splits.train
    splits = splits.selection(cfg.select_share, cfg.seed)
    datamodule = network_datamodule(cfg, recipe, backbone, splits, rt)
    param_groups, plan_callbacks, report = prepare_network(cfg, decision, recipe, backbone, splits, train, rt)
    module = network_classifier(cfg, recipe, backbone, splits, param_groups, schedule=False)
    head_lr = float(param_groups[-1]["lr"])  # apply_plan: the head's group is the last one
    make = module.optimizer_factory

    def factory(m: nn.Module) -> Any:
        out = make(m)
        hold_lr_ratios(out["optimizer"] if isinstance(out, dict) else out, head_lr)
        return out

    module.optimizer_factory = factory
    # Lightning's finder runs without the trainer's callbacks: the plan's BatchNorm policy is kept by a hook.
    eval_bn = [m for cb in plan_callbacks for m in getattr(cb, "eval_bn", [])]

    def keep_bn_policy(net: nn.Module, args: Any) -> None:
        for m in eval_bn:
            m.eval()

    handle = module.net.register_forward_pre_hook(keep_bn_policy)
    try:
        finder = _find(_range_trainer(rt, test, len(splits.train) // cfg.batch_size, progress=True), module, test,
                       datamodule=datamodule)
    finally:
        handle.remove()
    ratios = [{"group": g["name"], "lr_ratio": round(float(g["lr"]) / head_lr, 6)} for g in param_groups]
    return finder, {"trains": "network", "group_lr_ratios": ratios, **report,
                    "measured": f"the network as the plan fine-tunes it ({len(param_groups)} learning group(s), LRs "
                                "kept at their ratios to the head LR" + (", after the head warm-up on cached features"
                                                                           if "warmup" in report else "") + ")",
                    "lr_of": "the head group (train's --lr); the other groups move with it"}
