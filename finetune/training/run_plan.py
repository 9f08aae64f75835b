"""The executor: the only place that knows there are two kinds of plan.

`run_plan` takes the decided plan and returns a `FitResult`. Feature plans (small-*) train a linear
head on cached features of the frozen backbone; network plans (large-*, and everything from random
init) warm the head up on cached features, then fine-tune the planned layer groups with Lightning,
and the best checkpoint (or the warmed-up head, when fine-tuning did not beat it) is what returns.

Every choice is made on data inside the training split: cross-validation on cached features for
linear heads, a selection split carved from train for the network. The user's val and test splits
are not read here, except a feature plan's cached centre-crop probabilities on them, computed after
its head is final, for the report.
"""

from __future__ import annotations

import copy
import logging
import time
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

from finetune import runtime, timing
from finetune.config import BANK_MAX_IMAGES, TTA_MAX_IMAGES, TrainConfig
from finetune.data.folders import FolderSplits, Sample
from finetune.data.profile import stratified_indices, stratified_subset
from finetune.data.loaders import EpochShuffle, FolderDataModule, balanced_sampler_factory
from finetune.data.transforms import eval_transform, make_mixup, resize_size, train_transform
from finetune.errors import UserError
from finetune.model.backbone import Backbone
from finetune.model.heads import StageClassifier, load_linear
from finetune.model.outputs import Outputs
from finetune.strategy.decide import Plan, stage_index
from finetune.strategy.features import FINAL, FeatureSet, cached_features, cached_subset
from finetune.strategy.measure import Decision, _feature_kwargs, preserved_rng
from finetune.training import checkpoints, distributed
from finetune.training.callbacks import (EMA, EpochScores, ValidationTime, check_initial_loss, initial_loss,
                                         recipe_callbacks)
from finetune.training.freezing import apply_plan
from finetune.training.linear_probe import HeadResult, HeadSearch, fit_linear_head, head_data
from finetune.training.lr_range import hold_lr_ratios
from finetune.training.module import Classifier
from finetune.training.optim import make_optimizer_factory
from finetune.training.recipe import Recipe, class_weights

log = logging.getLogger(__name__)


CV_FOLDS = 5  # folds of the cross-validation that chooses a linear head's weight decay and epochs


@dataclass
class HeldOut:
    """Training images a model never fitted on, and that model (built on demand): what choices made after
    training (the test-time crops, the temperature, the unknown threshold) are scored on. The user's val
    and test are never held-out data."""

    samples: list[Sample]
    net: Callable[[], nn.Module] | None = None  # a network plan: its network, which scores the images
    # A feature plan's fold: () -> (per-crop logits [N, 10, K], per-crop features [N, 10, C], labels [N]) of (a
    # stratified subset of) these images, from its out-of-fold head on cached 10-crop features: no network
    # pass once they are cached.
    per_view: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    # What an image's unknown score is measured against (model.scoring.knn_score): () -> normalised features
    # [M, C] of the images this model fitted on (feature plans: cached); None (network plans): the held-out
    # images themselves, from the same pass (evaluation.trust), so that no pass over the fitted images is needed.
    bank: Callable[[], torch.Tensor] | None = None


@dataclass
class FitResult:
    """What a plan's execution hands to evaluation and tracking (on global rank 0).

    Every choice in it (epochs, weights, weight decay) was made on data inside the training split: the
    metrics are select_* (the selection split or cross-validation, `selection` says which images).
    """

    net: nn.Module  # the network to save: trained head, or fine-tuned (or warmed-up) network
    metrics: dict[str, Any]  # select_acc, select_loss, best_epoch / epochs, and what was compared
    selection: dict[str, Any]  # how the choices were made and on which images
    report: dict[str, Any] = field(default_factory=dict)  # plan-specific: head search, warm-up
    center_outputs: dict[str, Outputs] | None = None  # val/test centre-crop outputs from the cache (pretrained backbone)
    heldout: list[HeldOut] = field(default_factory=list)
    bank: Callable[[], torch.Tensor] | None = None  # the saved model's unknown-score bank (see HeldOut.bank)
    ddp: dict[str, Any] | None = None  # world size and whether the ranks ended in sync


@dataclass
class RunContext:
    """Where the run lives and how the executor talks back to it (tracking is a later stage)."""

    run_id: str
    output: Path
    logger: Any  # the Lightning logger (MLflow on rank 0)
    set_status: Callable[[str], None]  # marks the MLflow run FAILED / KILLED
    resume_checkpoint: Path | None = None
    identity: dict[str, Any] | None = None  # written into every checkpoint (`checkpoints.RunIdentity`)
    progress: bool = True  # Lightning's progress bar (on stdout); the pilot's candidates run without it
    # A list whose cached features hold every image of the run's splits (the pilot: the training split that the
    # measurement extracted, of which its splits are parts): those are read from its entry, not extracted again.
    # None: the run's own training split.
    features_within: list[Sample] | None = None


@timing.timed("fit")
def run_plan(cfg: TrainConfig, decision: Decision, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
             ctx: RunContext, rt: runtime.Runtime) -> FitResult | None:
    """Execute the decided plan; None on the ranks other than 0 of a multi-process run."""
    if decision.plan.train_on_features:
        return _fit_head(cfg, decision, recipe, backbone, splits, ctx.logger, rt, ctx.features_within)
    return _fit_network(cfg, decision, recipe, backbone, splits, ctx, rt)


def _fit_head(cfg: TrainConfig, decision: Decision, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
              logger: Any, rt: runtime.Runtime, within: list[Sample] | None = None) -> FitResult:
    """Feature plans: the linear head on cached features (weight decay and epochs cross-validated on train),
    its network, and its cached centre-crop probabilities on val and test (to report, never to choose).
    `within`: RunContext.features_within."""
    plan = decision.plan
    # What of the recipe acts on a linear head: its optimizer options, and the training loss and sampling
    # (the other recipe options are refused for feature plans: recipe.check_feature_plan_options).
    result = _head_on_features(cfg, recipe, backbone, splits.train, len(splits.classes), plan, plan.head_stage,
                               plan.epochs, plan.aug_views, logger, rt, fold_heads=True, within=within,
                               **_head_options(recipe, splits))
    net = head_network(backbone, plan, len(splits.classes))
    load_linear(_linear_of(net), result.weight, result.bias)
    kwargs = _feature_kwargs(cfg, rt)
    probs = _report_outputs(cfg, backbone, splits, plan.head_stage, net, rt, within)
    metrics = {"select_acc": result.select_acc, "select_loss": result.select_loss, "epochs": result.epochs}
    selection = {"protocol": f"{result.folds}-fold cross-validation on the training split's cached features "
                             "(weight decay and epochs); the head is then refitted on every training image",
                 "images": len(splits.train), "folds": result.folds}
    crop_outputs = _fold_crop_outputs(cfg, backbone, splits.train, plan.head_stage, result.fold_heads, rt)
    train_bank = _feature_bank(cached_subset(backbone, splits.train, within, **kwargs), plan.head_stage)
    heldout = [HeldOut([splits.train[int(r)] for r in rows], per_view=fold,
                       bank=lambda rows=rows: train_bank(exclude=rows))
               for (rows, _, _), fold in zip(result.fold_heads, crop_outputs)]
    return FitResult(net.eval(), metrics, selection,
                     {"weight_decay": result.weight_decay, "head_search": result.candidates},
                     center_outputs=probs, heldout=heldout, bank=train_bank)


def _fold_crop_outputs(cfg: TrainConfig, backbone: Backbone, train: list[Sample], stage: str,
                       fold_heads: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]], rt: runtime.Runtime
                       ) -> list[Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Per fold, on demand: its out-of-fold head on the cached 10-crop features of its held-out images (of a
    stratified subset of train of at most TTA_MAX_IMAGES, extracted once for all folds and cached): per-crop
    logits, the per-crop features themselves (the head's input) and the labels."""
    keep = stratified_subset(train, TTA_MAX_IMAGES)
    row_of = {id(sample): i for i, sample in enumerate(keep)}
    cache: list[FeatureSet] = []

    def crops() -> FeatureSet:
        if not cache:
            cache.append(cached_features(backbone, keep, crops="10crop", **_feature_kwargs(cfg, rt)))
        return cache[0]

    def fold_outputs(rows: np.ndarray, weight: torch.Tensor, bias: torch.Tensor
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feats = crops()
        mine = [row_of[id(train[int(r)])] for r in rows if id(train[int(r)]) in row_of]
        mine = [j for j in mine if feats.valid[j]]
        x = torch.from_numpy(np.asarray(feats.arrays[stage][:, mine], dtype=np.float32)).permute(1, 0, 2)  # [n, 10, C]
        logits = x @ weight.T + bias  # [n, 10, K]
        return logits.numpy(), x.numpy(), feats.labels[mine]

    return [lambda rows=rows, w=w, b=b: fold_outputs(rows, w, b) for rows, w, b in fold_heads]


def _feature_bank(train: FeatureSet, stage: str) -> Callable[..., torch.Tensor]:
    """`bank(exclude=rows)`: the normalised cached centre-crop features of `stage` of the training images (at
    most BANK_MAX_IMAGES, stratified), without the rows `exclude` (a fold's held-out images)."""
    x = torch.from_numpy(np.array(train.arrays[stage][0], dtype=np.float32))

    def bank(exclude: np.ndarray | None = None) -> torch.Tensor:
        keep = train.valid.copy()
        if exclude is not None:
            keep[np.asarray(exclude, dtype=int)] = False
        rows = np.flatnonzero(keep)
        rows = rows[stratified_indices(train.labels[rows], BANK_MAX_IMAGES)]
        return F.normalize(x[rows], dim=1)

    return bank


def _linear_of(net: nn.Module) -> nn.Module:
    return net.head if isinstance(net, StageClassifier) else net.get_classifier()


def _head_options(recipe: Recipe, splits: FolderSplits) -> dict[str, Any]:
    """What of the recipe acts on a feature plan's linear head besides its optimizer: the training loss and
    sampling (the other recipe options are refused for feature plans: recipe.check_feature_plan_options)."""
    n = len(splits.classes)
    return dict(
        class_weights=class_weights([s.label for s in splits.train], n) if recipe.class_weights == "auto" else None,
        balanced=recipe.sampler == "balanced", label_smoothing=recipe.label_smoothing)


def _head_inputs(cfg: TrainConfig, backbone: Backbone, train_samples: list[Sample], plan: Plan, stage: str,
                 aug_views: int, rt: runtime.Runtime | None, within: list[Sample] | None = None
                 ) -> tuple[list[np.ndarray], FeatureSet, runtime.Runtime]:
    """The cached features a head trains on: training views (clean, plus augmented ones), and where. `within`:
    a list holding `train_samples` (the whole training split) whose cached clean view is read instead."""
    kwargs = _feature_kwargs(cfg, rt)
    train = cached_subset(backbone, train_samples, within, **kwargs)
    views = [train.arrays[stage]]
    if aug_views:
        aug = cached_features(backbone, train_samples, views=aug_views, aug_preset=plan.augment, seed=cfg.seed,
                              **kwargs)
        views.append(aug.arrays[stage])
    return views, train, kwargs["rt"]


def _head_optimizer(recipe: Recipe) -> Callable[[list[dict[str, Any]], nn.Module], Any]:
    """The recipe's optimizer over a head search's groups, every head at the recipe's LR (--lr)."""
    def factory(groups: list[dict[str, Any]], module: nn.Module):
        return make_optimizer_factory(recipe, [{**g, "lr": recipe.lr} for g in groups])(module)

    return factory


def _head_on_features(cfg: TrainConfig, recipe: Recipe, backbone: Backbone, train_samples: list[Sample],
                      num_classes: int, plan: Plan, stage: str, epochs: int, aug_views: int, logger: Any,
                      rt: runtime.Runtime | None, fold_heads: bool = False, within: list[Sample] | None = None,
                      **head_options: Any) -> HeadResult:
    """A linear head on the cached features of `stage` of `train_samples` (weight decay and epochs chosen by
    cross-validation on them): a feature plan's model, or a network plan's head warm-up (which trains with
    the plain loss: `head_options` are the feature plan's). `within`: see `_head_inputs`."""
    views, train, rt = _head_inputs(cfg, backbone, train_samples, plan, stage, aug_views, rt, within)
    return fit_linear_head(views, train.labels, train.valid, num_classes, plan.weight_decay_grid,
                           epochs, cfg.batch_size, _head_optimizer(recipe), folds=CV_FOLDS, seed=cfg.seed,
                           logger=logger, rt=rt, fold_heads=fold_heads, **head_options)


def head_network(backbone: Backbone, plan: Plan, num_classes: int) -> nn.Module:
    """The network a feature plan saves: the timm model itself, or the model cut after a stage."""
    index = stage_index(plan.head_stage)
    if index is None:
        return backbone.model
    # A copy: StageClassifier prunes the later stages in place, and the backbone still serves the
    # feature cache (its weights are part of the cache key).
    return StageClassifier(copy.deepcopy(backbone.model), index, num_classes)



def _report_outputs(cfg: TrainConfig, backbone: Backbone, splits: FolderSplits, stage: str, net: nn.Module,
                    rt: runtime.Runtime, within: list[Sample] | None = None) -> dict[str, Outputs]:
    """The head of `net` (whose backbone is the pretrained one) on the cached centre-crop features of val and
    test (the audit's, when it ran; parts of `within`'s entry when given): the report's centre-crop outputs
    without a network pass."""
    kwargs = _feature_kwargs(cfg, rt)
    return {name: cached_center_outputs(cached_subset(backbone, samples, within, **kwargs), stage, net)
            for name, samples in (("val", splits.val), ("test", splits.test)) if samples}


def cached_center_outputs(features: FeatureSet, stage: str, net: nn.Module) -> Outputs:
    """A feature plan's head on cached centre-crop features: logits ``[N, 1, K]`` and the normalised features
    ``[N, 1, C]`` (NaN rows for images that failed to decode): the after-training report needs no network pass."""
    classifier = _linear_of(net)
    x = torch.from_numpy(np.array(features.arrays[stage][0], dtype=np.float32))
    with torch.no_grad():  # on the head's own device, wherever that is; the result on the CPU
        logits = classifier(x.to(runtime.module_device(classifier))).float().cpu()
    feats = F.normalize(x, dim=1)
    bad = torch.from_numpy(~features.valid)
    logits[bad], feats[bad] = float("nan"), float("nan")
    return Outputs(logits[:, None], feats[:, None], ["" if ok else "not decoded" for ok in features.valid])


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
    if plan.warmup_epochs and warm_up:
        started = time.perf_counter()
        with preserved_rng():  # cached or not, the fine-tuning that follows starts from the same RNG state
            result = _head_on_features(cfg, recipe, backbone, splits.train, len(splits.classes), plan, FINAL,
                                       plan.warmup_epochs, 0, False, rt, within=within)
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


def _fit_network(cfg: TrainConfig, decision: Decision, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
                 ctx: RunContext, rt: runtime.Runtime) -> FitResult | None:
    """Network plans, on the training split cut in two (`FolderSplits.selection`): the network fits on one
    part, and every choice (the epoch, EMA or raw, warm-up or fine-tuned) is made on the other, the
    selection split. Head warm-up (rank 0 alone: DDP gives every rank rank 0's weights when it wraps the
    model), frozen groups, Lightning fit; the best checkpoint, or the warmed-up head when it scores better."""
    plan = decision.plan
    inner = splits.selection(cfg.select_share, cfg.seed)
    datamodule = _datamodule(cfg, recipe, backbone, inner, rt)
    prepared = None
    within = ctx.features_within or splits.train  # the list whose cached features the warm-up reads

    def warm_up() -> dict[str, Any]:
        nonlocal prepared
        prepared = prepare_network(cfg, decision, recipe, backbone, inner, within, rt)
        return prepared[2]

    report = distributed.on_rank_zero(warm_up)
    param_groups, plan_callbacks, _ = prepared or prepare_network(cfg, decision, recipe, backbone, inner,
                                                                 within, rt, warm_up=False)
    module = _classifier(cfg, recipe, backbone, inner, param_groups)
    # The warmed-up head on the pretrained backbone is a candidate too: fine-tuning must beat it.
    warm_state = _cpu_state(module.net) if "warmup" in report else None
    trainer, checkpoint, rank_sync = _trainer(cfg, recipe, plan, ctx, rt, plan_callbacks, len(splits.classes))
    # A warmed-up head is not fresh: its loss is rightly below ln(C).
    if distributed.is_global_zero() and ctx.resume_checkpoint is None and not plan.warmup_epochs:
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
    center = (_report_outputs(cfg, backbone, splits, FINAL, module.net, rt, ctx.features_within)
              if metrics["weights"] == "warmup" else None)
    return FitResult(module.net, metrics, selection, report, heldout=[heldout], center_outputs=center,
                     ddp=rank_sync.report(trainer.world_size) if trainer.world_size > 1 else None)


def _datamodule(cfg: TrainConfig, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
                rt: runtime.Runtime) -> FolderDataModule:
    data_config = backbone.data_config
    size = resize_size(data_config)
    return FolderDataModule(
        splits, train_transform(data_config, recipe.augment), eval_transform(data_config),
        batch_size=cfg.batch_size, num_workers=rt.workers, pin_memory=rt.pin_memory,
        max_pixels=cfg.max_image_pixels, draft_size=(size, size),
        sampler_factory=balanced_sampler_factory(len(splits.classes)) if recipe.sampler == "balanced"
        else lambda samples: EpochShuffle(samples, cfg.seed))


def _classifier(cfg: TrainConfig, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
                param_groups: list[dict[str, Any]], schedule: bool = True) -> Classifier:
    """The network plan's LightningModule; `schedule=False`: constant LRs (an LR range test sets its own)."""
    n = len(splits.classes)
    schedule_args = (recipe.schedule, recipe.warmup_epochs) if schedule else ("constant", 0.0)
    return Classifier(
        backbone.model, n, make_optimizer_factory(recipe, param_groups, *schedule_args),
        class_weights=class_weights([s.label for s in splits.train], n) if recipe.class_weights == "auto" else None,
        label_smoothing=recipe.label_smoothing,
        mixup=make_mixup(recipe.mixup, recipe.cutmix, recipe.label_smoothing, n))


def _trainer(cfg: TrainConfig, recipe: Recipe, plan: Plan, ctx: RunContext, rt: runtime.Runtime,
             plan_callbacks: list[pl.Callback], num_classes: int
             ) -> tuple[pl.Trainer, ModelCheckpoint, distributed.RankSyncCheck]:
    folder = checkpoints.checkpoint_dir(ctx.output)
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor="select_acc", mode="max", save_weights_only=False)
    rank_sync = distributed.RankSyncCheck()
    trainer = pl.Trainer(
        max_epochs=plan.epochs, accelerator=cfg.accelerator, devices=runtime.parse_devices(cfg.devices),
        strategy=cfg.strategy, num_nodes=cfg.num_nodes, precision=rt.precision, logger=ctx.logger,
        # Any callback with state_dict/load_state_dict (EMA updates, RNG state, ...) is saved in the checkpoints and
        # restored on --resume by Lightning; its state must be tensors and plain data (weights_only).
        callbacks=[best, checkpoints.epoch_checkpoint(ctx.output), checkpoints.RngState(cfg.seed),
                   checkpoints.SaveOnInterrupt(folder / checkpoints.LAST_CHECKPOINT), rank_sync, ValidationTime(), EpochScores(),
                   *([TQDMProgressBar(refresh_rate=1)] if ctx.progress else []), *plan_callbacks,
                   *recipe_callbacks(recipe, num_classes, best),
                   *([checkpoints.RunIdentity(ctx.identity)] if ctx.identity else [])],
        # Every checkpoint is written to a temporary file in its own folder and renamed; `last.ckpt` two deep.
        plugins=[checkpoints.AtomicCheckpointIO()],
        default_root_dir=ctx.output, log_every_n_steps=1, num_sanity_val_steps=0, enable_model_summary=False,
        enable_progress_bar=ctx.progress)
    return trainer, best, rank_sync


@timing.timed("lightning fit")
def _fit(trainer: pl.Trainer, module: Classifier, datamodule: FolderDataModule, ctx: RunContext,
         cfg: TrainConfig) -> None:
    """`trainer.fit`, with the run marked FAILED on divergence and KILLED (checkpoint saved) on a signal."""
    on_interrupt = next(cb for cb in trainer.callbacks if isinstance(cb, checkpoints.SaveOnInterrupt))
    try:
        # weights_only: a checkpoint holding pickled code is refused, not run.
        trainer.fit(module, datamodule=datamodule, weights_only=True,
                    ckpt_path=str(ctx.resume_checkpoint) if ctx.resume_checkpoint else None)
    except UserError:  # divergence: the run is marked failed, the message says which checkpoint is good
        if distributed.is_global_zero():
            ctx.set_status("FAILED")
        raise
    except (SIGTERMException, SystemExit):
        if on_interrupt.interrupted is None:
            raise
        if distributed.is_global_zero():
            try:
                ctx.set_status("KILLED")
            except Exception:  # the hint below matters more than the status
                pass
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
    recorded = next(cb for cb in trainer.callbacks if isinstance(cb, EpochScores)).scores
    scored = recorded.get(int(best["epoch"]))
    if scored is None:  # a resumed run whose best epoch was validated before the resume
        # A logger-less trainer: the final numbers go to MLflow as final_*, not as an extra epoch point.
        evaluator = pl.Trainer(accelerator=rt.accelerator, devices=rt.lightning_devices, logger=False,
                               enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                               precision=rt.precision)
        scored = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    metrics = {**{k: float(scored[k]) for k in EpochScores.KEYS}, "best_epoch": int(best["epoch"]),
               "weights": "ema" if any(isinstance(cb, EMA) for cb in trainer.callbacks) else "raw"}
    if warm_state is not None and warmup is not None:
        metrics = _keep_warmup_if_better(module, warm_state, warmup["select"], metrics)
    return metrics


def _keep_warmup_if_better(module: Classifier, warm_state: dict[str, torch.Tensor], warm: dict[str, float],
                           metrics: dict[str, Any]) -> dict[str, Any]:
    """Keep the network as it was after the head warm-up (pretrained backbone + warmed-up head, scored `warm`)
    when fine-tuning did not beat it: a short schedule can leave the moved features behind the frozen ones
    (omniglot at 128 px, 2 epochs: 0.84 fine-tuned vs 0.875 warmed up)."""
    metrics = {**metrics, "select_acc_finetuned": metrics["select_acc"], "select_acc_warmup": warm["select_acc"]}
    if warm["select_acc"] <= metrics["select_acc"]:
        return metrics
    module.net.load_state_dict(warm_state)
    log.warning("Fine-tuning did not beat the warmed-up head on the selection split (%.4f <= %.4f): keeping the "
                "pretrained backbone with the warmed-up head. More --epochs, or a lower --lr, may let "
                "fine-tuning win.", metrics["select_acc"], warm["select_acc"])
    return {**metrics, **warm, "weights": "warmup", "best_epoch": -1}


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
    views, train, head_rt = _head_inputs(cfg, backbone, splits.train, plan, plan.head_stage, plan.aug_views, rt)
    options = _head_options(recipe, splits)
    data = head_data(views, train.labels, np.flatnonzero(train.valid), None, len(splits.classes), cfg.batch_size,
                     cfg.seed, options["balanced"])
    module = HeadSearch(data.in_features, len(splits.classes), plan.weight_decay_grid, _head_optimizer(recipe),
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
    datamodule = _datamodule(cfg, recipe, backbone, splits, rt)
    param_groups, plan_callbacks, report = prepare_network(cfg, decision, recipe, backbone, splits, train, rt)
    module = _classifier(cfg, recipe, backbone, splits, param_groups, schedule=False)
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
