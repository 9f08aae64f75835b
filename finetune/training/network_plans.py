"""Network plans (large-*, and everything from random init): the head warmed up on cached features, then the
planned layer groups fine-tuned with Lightning on the training split cut in two; the best checkpoint, or the
warmed-up head when fine-tuning did not beat it, is what returns."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

from finetune import runtime, timing
from finetune.config import TrainConfig
from finetune.data.folders import FolderSplits, Sample
from finetune.data.loaders import EpochShuffle, FolderDataModule, balanced_sampler_factory
from finetune.data.transforms import eval_transform, make_mixup, resize_size, train_transform
from finetune.model.backbone import Backbone
from finetune.model.heads import load_linear
from finetune.strategy.decide import Plan
from finetune.model.features import FINAL, FeatureSet, cached_subset
from finetune.strategy.measure import Decision, _feature_kwargs, preserved_rng
from finetune.training import checkpoints, distributed
from finetune.training.callbacks import (EMA, EpochScores, ValidationTime, check_initial_loss, initial_loss,
                                         recipe_callbacks)
from finetune.training.feature_plans import head_on_features, report_outputs
from finetune.training.freezing import apply_plan
from finetune.training.module import Classifier, selection_keys, selection_metric
from finetune.data.multilabel import label_matrix, macro_map
from finetune.training.multilabel_head import fit_multilabel_head
from finetune.training.optim import make_optimizer_factory
from finetune.training.plan_context import HeldOut, FitResult, RunContext
from finetune.training.recipe import Recipe, class_weights, positive_weights

log = logging.getLogger(__name__)


@timing.timed("head warm-up")
def prepare_network(cfg: TrainConfig, decision: Decision, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
                    within: list[Sample], rt: runtime.Runtime | None = None, warm_up: bool = True
                    ) -> tuple[list[dict[str, Any]], list[Any], dict[str, Any]]:
    """Large-data plans: warm the head up on cached features, then freeze the plan's groups.

    `splits` is the selection cut of the training split `within` (whose cached features the measurement
    made): the head fits on its train part, and is scored on its selection part from the same cache, a
    candidate that costs no validation pass. `warm_up=False` skips fitting the head (the other ranks of a
    DDP run: they get rank 0's head when DDP wraps the model). Returns the optimizer's param groups, the
    Lightning callbacks, and what to report.
    """
    plan = decision.plan
    info: dict[str, Any] = {}
    if plan.head_warmup_epochs and warm_up and splits.multi_label:
        info["warmup"] = _multi_label_warm_up(cfg, backbone, splits, within, rt)
    elif plan.head_warmup_epochs and warm_up:
        started = time.perf_counter()
        with preserved_rng():  # cached or not, the fine-tuning that follows starts from the same RNG state
            result = head_on_features(cfg, recipe, backbone, splits.train, len(splits.classes), plan, FINAL,
                                       plan.head_warmup_epochs, 0, False, rt, within=within)
            selection = cached_subset(backbone, splits.val, within, **_feature_kwargs(cfg, rt))
        load_linear(backbone.model.get_classifier(), result.weight, result.bias)
        # Scored as the validation loop scores the fine-tuned network (its loss weighs the classes the same way).
        weights = (class_weights([s.label for s in splits.train], len(splits.classes))
                   if recipe.class_weights == "auto" else None)
        info["warmup"] = {"cv_acc": result.select_acc, "weight_decay": result.weight_decay, "epochs": result.epochs,
                          "select": head_scores(selection, result.weight, result.bias, weights),
                          "seconds": round(time.perf_counter() - started, 2)}
        log.info("Head warm-up on cached features: cross-validated acc %.4f", result.select_acc)
    param_groups, callback = apply_plan(backbone.model, decision.groups, plan.bn_policy)
    return param_groups, [callback], info


def _multi_label_warm_up(cfg: TrainConfig, backbone: Backbone, splits: FolderSplits, within: list[Sample],
                         rt: runtime.Runtime | None) -> dict[str, Any]:
    """Several labels per image: the one-vs-rest logistic head on the fit part's cached features
    (`multilabel_head`), loaded into the network's classifier, and scored on the selection part as the
    validation loop scores the network (select_map, select_loss)."""
    started = time.perf_counter()
    n = len(splits.classes)
    with preserved_rng():
        fit = cached_subset(backbone, splits.train, within, **_feature_kwargs(cfg, rt))
        selection = cached_subset(backbone, splits.val, within, **_feature_kwargs(cfg, rt))
    x, _ = fit.matrix(FINAL)
    y = label_matrix([s.labels for s, ok in zip(splits.train, fit.valid) if ok], n)
    head = fit_multilabel_head(x, y, cfg.seed)
    load_linear(backbone.model.get_classifier(), head.weight, head.bias)
    sx, _ = selection.matrix(FINAL)
    sy = label_matrix([s.labels for s, ok in zip(splits.val, selection.valid) if ok], n)
    with torch.no_grad():
        logits = torch.from_numpy(sx) @ head.weight.T + head.bias
        loss = float(F.binary_cross_entropy_with_logits(logits, torch.from_numpy(sy).float()))
    select = {"select_map": macro_map(torch.sigmoid(logits).numpy(), sy), "select_loss": loss}
    log.info("Head warm-up on cached features (one-vs-rest logistic regression, C %g): selection mAP %.4f",
             head.c, select["select_map"])
    return {"c": head.c, "held_out_map": head.held_out_map, "select": select,
            "seconds": round(time.perf_counter() - started, 2)}


def head_scores(features: FeatureSet, weight: torch.Tensor, bias: torch.Tensor,
                class_weights: torch.Tensor | None) -> dict[str, float]:
    """select_acc, select_loss, select_acc_top5 of a linear head on cached final features (the images that
    decoded), computed as the validation loop computes them (`Classifier.model_step`)."""
    x, y = features.matrix(FINAL)
    with torch.no_grad():
        logits = torch.from_numpy(x) @ weight.float().T + bias.float()
        target = torch.from_numpy(np.asarray(y, dtype=np.int64))
        k = min(5, logits.shape[1])
        return {"select_acc": float((logits.argmax(1) == target).float().mean()),
                "select_loss": float(F.cross_entropy(logits, target, weight=class_weights)),
                "select_acc_top5": float((logits.topk(k, dim=1).indices == target[:, None]).any(1).float().mean())}


def fit_network_plan(cfg: TrainConfig, decision: Decision, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
                 ctx: RunContext, rt: runtime.Runtime) -> FitResult | None:
    """Network plans, on the training split cut in two (`FolderSplits.selection`): the network fits on one
    part, and every choice (the epoch, EMA or raw, warm-up or fine-tuned) is made on the other, the
    selection split. Head warm-up (rank 0 alone: DDP gives every rank rank 0's weights when it wraps the
    model), frozen groups, Lightning fit; the best checkpoint, or the warmed-up head when it scores better."""
    plan = decision.plan
    inner = splits.selection(cfg.select_share, cfg.seed)
    datamodule = network_datamodule(cfg, recipe, backbone, inner, rt)
    prepared = None
    within = ctx.features_within or splits.train  # the list whose cached features the warm-up reads

    def warm_up() -> dict[str, Any]:
        nonlocal prepared
        prepared = prepare_network(cfg, decision, recipe, backbone, inner, within, rt)
        return prepared[2]

    report = distributed.on_rank_zero(warm_up)
    param_groups, plan_callbacks, _ = prepared or prepare_network(cfg, decision, recipe, backbone, inner,
                                                                 within, rt, warm_up=False)
    module = network_classifier(cfg, recipe, backbone, inner, param_groups)
    # The warmed-up head on the pretrained backbone is a candidate too: fine-tuning must beat it.
    warm_state = _cpu_state(module.net) if "warmup" in report else None
    trainer, checkpoint, rank_sync = _trainer(cfg, recipe, plan, ctx, rt, plan_callbacks, len(splits.classes),
                                              splits.multi_label)
    # A warmed-up head is not fresh: its loss is rightly below ln(C) (a multi-label loss is not compared with it).
    if (distributed.is_global_zero() and ctx.resume_checkpoint is None and not plan.head_warmup_epochs
            and not splits.multi_label):
        _babysit_initial_loss(module, datamodule, len(splits.classes), ctx.logger, rt)
    _fit(trainer, module, datamodule, ctx, cfg)
    if not trainer.is_global_zero:
        return None
    metrics = _pick_weights(module, datamodule, trainer, checkpoint, report.get("warmup"), warm_state, ctx.output, rt)
    selection = {"protocol": f"selection split: {len(inner.val)} training images held out (stratified, "
                             f"--select-fraction {cfg.select_share:g}, seed {cfg.seed}); the network fitted on "
                             f"the other {len(inner.train)}",
                 "images": len(inner.val), "fit_images": len(inner.train)}
    heldout = HeldOut(inner.val, net=lambda: module.net)
    # The warmed-up head kept: the backbone is the pretrained one, whose val/test features are cached.
    center = (report_outputs(cfg, backbone, splits, FINAL, module.net, rt, ctx.features_within)
              if metrics["weights"] == "warmup" and not splits.multi_label else None)
    return FitResult(module.net, metrics, selection, report, heldout=[heldout], center_outputs=center,
                     ddp=rank_sync.report(trainer.world_size) if trainer.world_size > 1 else None)


def network_datamodule(cfg: TrainConfig, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
                rt: runtime.Runtime) -> FolderDataModule:
    data_config = backbone.data_config
    size = resize_size(data_config)
    return FolderDataModule(
        splits, train_transform(data_config, recipe.augment), eval_transform(data_config),
        batch_size=cfg.batch_size, num_workers=rt.workers, pin_memory=rt.pin_memory,
        max_pixels=cfg.max_image_pixels, draft_size=(size, size),
        sampler_factory=balanced_sampler_factory(len(splits.classes)) if recipe.sampler == "balanced"
        else lambda samples: EpochShuffle(samples, cfg.seed))


def network_classifier(cfg: TrainConfig, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
                param_groups: list[dict[str, Any]], schedule: bool = True) -> Classifier:
    """The network plan's LightningModule; `schedule=False`: constant LRs (an LR range test sets its own)."""
    n, multi = len(splits.classes), splits.multi_label
    schedule_args = (recipe.schedule, recipe.warmup_epochs) if schedule else ("constant", 0.0)
    weights = None
    if recipe.class_weights == "auto":
        weights = (positive_weights([s.labels for s in splits.train], n) if multi else
                   class_weights([s.label for s in splits.train], n))
    return Classifier(
        backbone.model, n, make_optimizer_factory(recipe, param_groups, *schedule_args), class_weights=weights,
        label_smoothing=recipe.label_smoothing,
        mixup=make_mixup(recipe.mixup, recipe.cutmix, recipe.label_smoothing, n, multi), multi_label=multi)


def _trainer(cfg: TrainConfig, recipe: Recipe, plan: Plan, ctx: RunContext, rt: runtime.Runtime,
             plan_callbacks: list[pl.Callback], num_classes: int, multi_label: bool = False
             ) -> tuple[pl.Trainer, ModelCheckpoint, distributed.RankSyncCheck]:
    folder = checkpoints.checkpoint_dir(ctx.output)
    # Saved when validation ends, like `last.ckpt` and before it (the callbacks' order): a resume point then holds
    # this epoch's best candidate. Left to Lightning, it saved at the train epoch's end, after `last.ckpt` had
    # recorded the previous best, and a run resumed from there could pick a worse epoch.
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor=selection_metric(multi_label), mode="max",
                           save_weights_only=False, save_on_train_epoch_end=False)
    rank_sync = distributed.RankSyncCheck()
    trainer = pl.Trainer(
        max_epochs=plan.epochs, accelerator=cfg.accelerator, devices=runtime.parse_devices(cfg.devices),
        strategy=cfg.strategy, num_nodes=cfg.num_nodes, precision=rt.precision, logger=ctx.logger,
        # Any callback with state_dict/load_state_dict (EMA updates, RNG state, ...) is saved in the checkpoints and
        # restored on --resume by Lightning; its state must be tensors and plain data (weights_only).
        callbacks=[best, checkpoints.epoch_checkpoint(ctx.output), checkpoints.RngState(cfg.seed),
                   checkpoints.SaveOnInterrupt(folder / checkpoints.LAST_CHECKPOINT), rank_sync, ValidationTime(),
                   EpochScores(selection_keys(multi_label)),
                   *([TQDMProgressBar(refresh_rate=1)] if ctx.progress else []), *plan_callbacks,
                   *recipe_callbacks(recipe, num_classes, best, selection_metric(multi_label)),
                   *([checkpoints.RunIdentity(ctx.identity)] if ctx.identity else [])],
        # Every checkpoint is written to a temporary file in its own folder and renamed; `last.ckpt` two deep.
        plugins=[checkpoints.AtomicCheckpointIO()],
        default_root_dir=ctx.output, log_every_n_steps=1, num_sanity_val_steps=0, enable_model_summary=False,
        enable_progress_bar=ctx.progress)
    return trainer, best, rank_sync


@timing.timed("lightning fit")
def _fit(trainer: pl.Trainer, module: Classifier, datamodule: FolderDataModule, ctx: RunContext,
         cfg: TrainConfig) -> None:
    """`trainer.fit`; a signal (checkpoint saved) becomes `Interrupted`, whose message says how to resume. The
    workflow that started the MLflow run ends it (KILLED, or FAILED on divergence and any other error)."""
    on_interrupt = next(cb for cb in trainer.callbacks if isinstance(cb, checkpoints.SaveOnInterrupt))
    try:
        # weights_only: a checkpoint holding pickled code is refused, not run.
        trainer.fit(module, datamodule=datamodule, weights_only=True,
                    ckpt_path=str(ctx.resume_checkpoint) if ctx.resume_checkpoint else None)
    except (SIGTERMException, SystemExit):
        if on_interrupt.interrupted is None:
            raise
        raise checkpoints.Interrupted(
            f"Training interrupted in epoch {trainer.current_epoch + 1}; checkpoint saved to {on_interrupt.path}. "
            f"Continue with: {checkpoints.resume_hint(cfg, ctx.run_id)}") from None


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _babysit_initial_loss(module: Classifier, datamodule: FolderDataModule, num_classes: int, logger: Any,
                          rt: runtime.Runtime) -> None:
    """Before training: a fresh head should start at a loss of about ln(C); warn with numbers if not."""
    loss = initial_loss(module.net, datamodule.val_dataloader(), rt)
    logger.log_metrics({"initial_loss": loss}, step=0)
    warning = check_initial_loss(loss, num_classes)
    if warning:
        log.warning(warning)


@timing.timed("pick weights")
def _pick_weights(module: Classifier, datamodule: FolderDataModule, trainer: pl.Trainer,
                  checkpoint: ModelCheckpoint, warmup: dict[str, Any] | None,
                  warm_state: dict[str, torch.Tensor] | None, output: Path, rt: runtime.Runtime) -> dict[str, Any]:
    """Load the best checkpoint (by selection accuracy), then keep the warm-up candidate instead when it scored
    better; `module` ends up holding the winner. Each candidate is scored once: the best epoch by its
    validation during the fit, the warm-up on cached features (`prepare_network`). With --ema the checkpoints
    hold the EMA weights (Lightning's weight averaging validated and saved them): `weights` says "ema"."""
    best_path = checkpoint.best_model_path or str(checkpoints.checkpoint_dir(output) / checkpoints.LAST_CHECKPOINT)
    best = checkpoints.load_checkpoint(best_path)
    module.load_state_dict(best["state_dict"])
    scores = next(cb for cb in trainer.callbacks if isinstance(cb, EpochScores))
    recorded = scores.scores
    scored = recorded.get(int(best["epoch"]))
    if scored is None:  # a resumed run whose best epoch was validated before the resume
        # A logger-less trainer: the final numbers go to MLflow as final_*, not as an extra epoch point.
        evaluator = pl.Trainer(accelerator=rt.accelerator, devices=rt.lightning_devices, logger=False,
                               enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                               precision=rt.precision)
        scored = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    metrics = {**{k: float(scored[k]) for k in scores.keys}, "best_epoch": int(best["epoch"]),
               "weights": "ema" if any(isinstance(cb, EMA) for cb in trainer.callbacks) else "raw"}
    if warm_state is not None and warmup is not None:
        metrics = _keep_warmup_if_better(module, warm_state, warmup["select"], metrics,
                                         selection_metric(module.multi_label))
    return metrics


def _keep_warmup_if_better(module: Classifier, warm_state: dict[str, torch.Tensor], warm: dict[str, float],
                           metrics: dict[str, Any], key: str = "select_acc") -> dict[str, Any]:
    """Keep the network as it was after the head warm-up (pretrained backbone + warmed-up head, scored `warm`)
    when fine-tuning did not beat it: a short schedule can leave the moved features behind the frozen ones
    (omniglot at 128 px, 2 epochs: 0.84 fine-tuned vs 0.875 warmed up)."""
    metrics = {**metrics, f"{key}_finetuned": metrics[key], f"{key}_warmup": warm[key]}
    if warm[key] <= metrics[key]:
        return metrics
    module.net.load_state_dict(warm_state)
    log.warning("Fine-tuning did not beat the warmed-up head on the selection split (%s %.4f <= %.4f): keeping the "
                "pretrained backbone with the warmed-up head. More --epochs, or a lower --lr, may let "
                "fine-tuning win.", key, metrics[key], warm[key])
    return {**metrics, **warm, "weights": "warmup", "best_epoch": -1}
