"""Feature plans (small-*): a linear head on cached features of the frozen backbone, chosen by cross-validation
on train; the head is then refitted on every training image."""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune import runtime
from finetune.config import BANK_MAX_IMAGES, TTA_MAX_IMAGES, TrainConfig
from finetune.data.folders import FolderSplits, Sample
from finetune.data.profile import stratified_indices, stratified_subset
from finetune.model.backbone import Backbone
from finetune.model.heads import StageClassifier, load_linear
from finetune.model.outputs import Outputs
from finetune.model.stages import stage_index
from finetune.strategy.decide import Plan
from finetune.model.features import FeatureSet, cached_features, cached_subset
from finetune.strategy.measure import Decision, _feature_kwargs
from finetune.training.linear_probe import HeadResult, fit_linear_head
from finetune.training.optim import make_optimizer_factory
from finetune.training.plan_context import CV_FOLDS, HeldOut, FitResult
from finetune.training.recipe import Recipe, class_weights


def fit_feature_plan(cfg: TrainConfig, decision: Decision, recipe: Recipe, backbone: Backbone, splits: FolderSplits,
              logger: Any, rt: runtime.Runtime, within: list[Sample] | None = None) -> FitResult:
    """Feature plans: the linear head on cached features (weight decay and epochs cross-validated on train),
    its network, and its cached centre-crop probabilities on val and test (to report, never to choose).
    `within`: RunContext.features_within."""
    plan = decision.plan
    # What of the recipe acts on a linear head: its optimizer options, and the training loss and sampling
    # (the other recipe options are refused for feature plans: recipe.check_feature_plan_options).
    result = head_on_features(cfg, recipe, backbone, splits.train, len(splits.classes), plan, plan.head_stage,
                               plan.epochs, plan.aug_views, logger, rt, fold_heads=True, within=within,
                               **head_options(recipe, splits))
    net = head_network(backbone, plan, len(splits.classes))
    load_linear(_linear_of(net), result.weight, result.bias)
    kwargs = _feature_kwargs(cfg, rt)
    probs = report_outputs(cfg, backbone, splits, plan.head_stage, net, rt, within)
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


def head_options(recipe: Recipe, splits: FolderSplits) -> dict[str, Any]:
    """What of the recipe acts on a feature plan's linear head besides its optimizer: the training loss and
    sampling (the other recipe options are refused for feature plans: recipe.check_feature_plan_options)."""
    n = len(splits.classes)
    return dict(
        class_weights=class_weights([s.label for s in splits.train], n) if recipe.class_weights == "auto" else None,
        balanced=recipe.sampler == "balanced", label_smoothing=recipe.label_smoothing)


def head_inputs(cfg: TrainConfig, backbone: Backbone, train_samples: list[Sample], plan: Plan, stage: str,
                 aug_views: int, rt: runtime.Runtime | None, within: list[Sample] | None = None
                 ) -> tuple[list[np.ndarray], FeatureSet, runtime.Runtime]:
    """The cached features a head trains on: training views (clean, plus augmented ones), and where. `within`:
    a list holding `train_samples` (the whole training split) whose cached clean view is read instead."""
    kwargs = _feature_kwargs(cfg, rt)
    train = cached_subset(backbone, train_samples, within, **kwargs)
    views = [train.arrays[stage]]
    if aug_views:
        aug = cached_features(backbone, train_samples, views=aug_views, aug_preset=plan.cache_augment, seed=cfg.seed,
                              **kwargs)
        views.append(aug.arrays[stage])
    return views, train, kwargs["rt"]


def head_optimizer(recipe: Recipe) -> Callable[[list[dict[str, Any]], nn.Module], Any]:
    """The recipe's optimizer over a head search's groups, every head at the recipe's LR (--lr)."""
    def factory(groups: list[dict[str, Any]], module: nn.Module):
        return make_optimizer_factory(recipe, [{**g, "lr": recipe.lr} for g in groups])(module)

    return factory


def head_on_features(cfg: TrainConfig, recipe: Recipe, backbone: Backbone, train_samples: list[Sample],
                      num_classes: int, plan: Plan, stage: str, epochs: int, aug_views: int, logger: Any,
                      rt: runtime.Runtime | None, fold_heads: bool = False, within: list[Sample] | None = None,
                      **head_options: Any) -> HeadResult:
    """A linear head on the cached features of `stage` of `train_samples` (weight decay and epochs chosen by
    cross-validation on them): a feature plan's model, or a network plan's head warm-up (which trains with
    the plain loss: `head_options` are the feature plan's). `within`: see `head_inputs`."""
    views, train, rt = head_inputs(cfg, backbone, train_samples, plan, stage, aug_views, rt, within)
    return fit_linear_head(views, train.labels, train.valid, num_classes, plan.weight_decay_grid,
                           epochs, cfg.batch_size, head_optimizer(recipe), folds=CV_FOLDS, seed=cfg.seed,
                           logger=logger, rt=rt, fold_heads=fold_heads, **head_options)


def head_network(backbone: Backbone, plan: Plan, num_classes: int) -> nn.Module:
    """The network a feature plan saves: the timm model itself, or the model cut after a stage."""
    index = stage_index(plan.head_stage)
    if index is None:
        return backbone.model
    # A copy: StageClassifier prunes the later stages in place, and the backbone still serves the
    # feature cache (its weights are part of the cache key).
    return StageClassifier(copy.deepcopy(backbone.model), index, num_classes)


def report_outputs(cfg: TrainConfig, backbone: Backbone, splits: FolderSplits, stage: str, net: nn.Module,
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
