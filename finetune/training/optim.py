"""Optimizers and learning-rate schedules for the parameter groups a plan hands over.

Each plan group has its own learning rate; the optimizer comes from timm's `create_optimizer_v2`, the
schedule from `torch.optim.lr_scheduler`, stepped once per iteration (so warmup and cosine/one-cycle
are smooth, and step/exponential decay lands exactly on epoch boundaries).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn
from torch.optim import lr_scheduler

from finetune.config import OPTIMIZERS, SCHEDULES, TrainConfig
from finetune.training.recipe import NETWORK_WEIGHT_DECAY, Recipe
from finetune.errors import UserError

log = logging.getLogger(__name__)

# What each name means in timm's registry: timm's "sgd" is Nesterov SGD, "momentum" is plain
# momentum SGD; --nesterov picks between them.
_TIMM_NAMES = {"adagrad": "adagrad", "rmsprop": "rmsprop", "adam": "adam", "adamw": "adamw"}
WARMUP_START_FACTOR = 0.01
DEFAULT_MOMENTUM = 0.9


def no_weight_decay_params(model: nn.Module) -> set[int]:
    """Ids of the trainable parameters timm would not decay: biases and norm weights (1-d), and what
    each timm model lists in its own `no_weight_decay()` (a ViT's `pos_embed`, `cls_token`, ...).

    timm's `param_groups_weight_decay` decides; the names a model lists are prefixed with where that
    model sits (inside a LightningModule, a stage classifier's trunk).
    """
    names: set[str] = set()
    for prefix, m in model.named_modules():
        listed = getattr(m, "no_weight_decay", None)
        if callable(listed) and not isinstance(m, type):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    groups = param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=names)
    return {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}


def split_weight_decay(param_groups: list[dict[str, Any]], weight_decay: float,
                       no_decay: set[int] = frozenset()) -> list[dict[str, Any]]:
    """Each plan group split in two: decayed weights, and the parameters in `no_decay` (see
    `no_weight_decay_params`) plus any 1-d parameter, without decay.

    Decaying a norm's scale, a bias or a position embedding does not regularise the function and
    only fights the normalisation (or the learned positions), so they get none. The plan hands over
    groups with their own LRs, so timm's model-level decision is applied per group here. A group
    that carries its own ``weight_decay`` keeps it (the linear-head search trains one head per value).
    """
    out: list[dict[str, Any]] = []
    for group in param_groups:
        group_decay = group.get("weight_decay", weight_decay)
        params = [p for p in group["params"] if p.requires_grad]
        skip = [p for p in params if p.ndim <= 1 or id(p) in no_decay]
        skip_ids = {id(p) for p in skip}
        decay = [p for p in params if id(p) not in skip_ids]
        extra = {k: v for k, v in group.items() if k not in ("params", "name", "weight_decay")}
        name = group.get("name", f"group{len(out)}")
        if decay:
            out.append({**extra, "params": decay, "name": name, "weight_decay": group_decay})
        if skip:
            out.append({**extra, "params": skip, "name": f"{name}/no_decay", "weight_decay": 0.0})
    return out


def create_optimizer(cfg: Recipe | TrainConfig, param_groups: list[dict[str, Any]],
                     model: nn.Module | None = None) -> torch.optim.Optimizer:
    """timm optimizer over the plan's groups (their own `lr`), weight decay only where it makes sense
    (`model`: the module the groups come from, whose `no_weight_decay()` names are honoured)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"Invalid optimizer {cfg.optimizer!r}. Valid values: {', '.join(OPTIMIZERS)}.")
    # A bare TrainConfig (tests, benchmarks) leaves it None: the fine-tuning default, as a Recipe resolves it.
    weight_decay = NETWORK_WEIGHT_DECAY if cfg.weight_decay is None else cfg.weight_decay
    groups = split_weight_decay(param_groups, weight_decay,
                                no_weight_decay_params(model) if model is not None else frozenset())
    if not groups:
        raise UserError("Nothing to train: every parameter is frozen.")
    kwargs: dict[str, Any] = {}
    if cfg.optimizer == "sgd":
        name = "sgd" if cfg.nesterov else "momentum"
        kwargs["momentum"] = DEFAULT_MOMENTUM if cfg.momentum is None else cfg.momentum
    elif cfg.optimizer == "rmsprop":
        name = "rmsprop"
        kwargs["momentum"] = DEFAULT_MOMENTUM if cfg.momentum is None else cfg.momentum
    else:
        name = _TIMM_NAMES[cfg.optimizer]
    if cfg.nesterov and cfg.optimizer != "sgd":
        raise UserError(f"--nesterov applies to --optimizer sgd only (got {cfg.optimizer}).")
    # filter_bias_and_bn only acts on a model; the split above already did it for the groups.
    return create_optimizer_v2(groups, opt=name, lr=cfg.lr, weight_decay=weight_decay, **kwargs)


def create_scheduler(cfg: Recipe | TrainConfig, optimizer: torch.optim.Optimizer, schedule: str, warmup_epochs: float,
                     steps_per_epoch: int, epochs: int) -> lr_scheduler.LRScheduler | None:
    """A per-iteration schedule (None for constant without warmup)."""
    if schedule not in SCHEDULES:
        raise UserError(f"Invalid schedule {schedule!r}. Valid values: {', '.join(SCHEDULES)}.")
    steps_per_epoch = max(1, int(steps_per_epoch))
    total = steps_per_epoch * epochs
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
    if schedule == "onecycle":
        # One-cycle has its own warmup (the rising half): --warmup-epochs sets its length (default 30%).
        pct = warmup / total if warmup > 0 else 0.3
        momentum = "momentum" in optimizer.defaults or "betas" in optimizer.defaults
        return lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                       total_steps=total, pct_start=max(pct, 1.0 / total),
                                       cycle_momentum=momentum and optimizer.defaults.get("momentum", 1) != 0)
    main_steps = total - warmup
    if schedule == "constant":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif schedule == "step":
        step_epochs = cfg.step_epochs or max(1, epochs // 3)
        main = lr_scheduler.StepLR(optimizer, step_size=step_epochs * steps_per_epoch, gamma=cfg.lr_gamma or 0.1)
    elif schedule == "exponential":
        # Decay per epoch, applied at the epoch boundary (StepLR with a one-epoch step is exactly that).
        main = lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch, gamma=cfg.lr_gamma or 0.9)
    else:  # cosine
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, main_steps), eta_min=0.0)
    if warmup <= 0:
        return None if schedule == "constant" else main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, end_factor=1.0, total_iters=warmup)
    if schedule == "cosine":  # the cosine spans the steps after warmup
        return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
    # Step/exponential drops stay on epoch boundaries: the ramp multiplies the schedule, not delays it.
    return lr_scheduler.ChainedScheduler([ramp, main], optimizer=optimizer)


def make_optimizer_factory(cfg: Recipe | TrainConfig, param_groups: list[dict[str, Any]], schedule: str = "constant",
                           warmup_epochs: float = 0.0) -> Callable[[nn.Module], Any]:
    """A callable for `Classifier(optimizer_factory=...)`: returns what configure_optimizers returns.

    Args:
        cfg: the recipe (its optimizer options; a TrainConfig has the same names).
        param_groups: torch-style groups, each ``{"params": [...], "lr": float, "name": str}``.
        schedule: one of SCHEDULES (the resolved recipe's).
        warmup_epochs: linear warmup length, in (fractional) epochs.
    """

    def factory(module: nn.Module) -> Any:
        optimizer = create_optimizer(cfg, param_groups, module)
        trainer = getattr(module, "_trainer", None)
        if trainer is None:  # outside a Trainer (a bare call): no schedule to attach
            return optimizer
        epochs = max(1, trainer.max_epochs or 1)
        steps_per_epoch = max(1, int(trainer.estimated_stepping_batches // epochs))
        scheduler = create_scheduler(cfg, optimizer, schedule, warmup_epochs, steps_per_epoch, epochs)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    return factory
