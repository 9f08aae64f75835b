"""Measure, decide, execute: the four-scenario strategy wired to data, features and training.

`measure_and_decide` profiles the data, runs the frozen backbone once over the training images
(cached), measures the similarity and calls the pure decision in `strategy`. `fit_on_features`
executes the small-data plans (a linear head on cached features); `prepare_network` readies the
large-data plans for Lightning (head warm-up on cached features, frozen groups, per-group LRs and
the callback that keeps frozen layers frozen). `train.train` calls these; so do `finetune plan`
and bench/scenarios.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.backbone import Backbone
from finetune.config import TrainConfig
from finetune.data import FolderSplits
from finetune import runtime
from finetune.features import FINAL, FeatureSet, cached_features
from finetune.freezing import GroupSetting, apply_plan, layer_groups, plan_groups
from finetune.heads import HeadResult, StageClassifier, fit_linear_head, load_linear
from finetune.optim import make_optimizer_factory
from finetune.profile import DatasetProfile, profile_splits, stratified_subset
from finetune.similarity import Similarity, measure
from finetune.strategy import BN_POLICIES, SCENARIO_NAMES, Plan, decide, load_scenario_defaults, load_thresholds

log = logging.getLogger(__name__)


@dataclass
class Decision:
    """Everything `finetune plan` shows and `train` logs: the measurements and the plan."""

    profile: DatasetProfile
    similarity: Similarity
    plan: Plan
    groups: list[GroupSetting]  # the plan resolved against the model's layer groups
    probe_images: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.plan.scenario, "plan": self.plan.to_dict(), "profile": self.profile.to_dict(),
                "similarity": self.similarity.to_dict(), "groups": [dataclasses.asdict(g) for g in self.groups],
                "probe_images": self.probe_images, "timings": self.timings}

    def params(self) -> dict[str, Any]:
        """The flat numbers worth a column in MLflow (params)."""
        p = self.plan
        return {"scenario": p.scenario, "plan_source": p.source, "profile": self.profile.to_dict(),
                "similarity": {"score": self.similarity.score, **self.similarity.components,
                               "best_stage": self.similarity.best_stage},
                "plan": {"head_stage": p.head_stage, "train_on_features": p.train_on_features,
                         "frozen_groups": sum(1 for g in self.groups if g.frozen),
                         "backbone_lr_mult": p.backbone_lr_mult, "layer_decay": p.layer_decay,
                         "epochs": p.epochs, "warmup_epochs": p.warmup_epochs, "aug_views": p.aug_views}}


def process_runtime(cfg: TrainConfig) -> runtime.Runtime:
    """This process's runtime for `cfg` (`train` passes the one it configured)."""
    return runtime.resolve(cfg.accelerator, cfg.devices, cfg.strategy, cfg.precision, cfg.num_workers)


def _feature_kwargs(cfg: TrainConfig, rt: runtime.Runtime | None) -> dict[str, Any]:
    return dict(batch_size=cfg.batch_size, max_pixels=cfg.max_image_pixels, rt=rt or process_runtime(cfg))


def train_features(cfg: TrainConfig, backbone: Backbone, splits: FolderSplits, limit: int | None = None,
                   rt: runtime.Runtime | None = None) -> FeatureSet:
    samples = splits.train if limit is None else stratified_subset(splits.train, limit)
    return cached_features(backbone, samples, **_feature_kwargs(cfg, rt))


@contextlib.contextmanager
def preserved_rng():
    """Run a block without moving the random generators (torch, numpy, random).

    Whether features come from the cache or are extracted (a DataLoader draws a seed from torch's
    generator even with no workers) must not change what a seeded run does afterwards.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    # This process's own GPU only: under DDP every rank has one, and touching the others' creates contexts there.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def measure_and_decide(cfg: TrainConfig, splits: FolderSplits, backbone: Backbone,
                       rt: runtime.Runtime | None = None) -> Decision:
    """Profile, measure the similarity on (cached) features, and decide the plan."""
    with preserved_rng():
        return _measure_and_decide(cfg, splits, backbone, rt)


def _measure_and_decide(cfg: TrainConfig, splits: FolderSplits, backbone: Backbone,
                        rt: runtime.Runtime | None) -> Decision:
    thresholds = load_thresholds()
    defaults = {name: load_scenario_defaults(name) for name in SCENARIO_NAMES}
    profile = profile_splits(splits)
    started = time.perf_counter()
    feats = train_features(cfg, backbone, splits, thresholds.probe_max_images, rt)
    extracted = time.perf_counter() - started
    similarity = measure(feats, thresholds.similarity_weights, thresholds.probe_folds, thresholds.probe_alpha)
    probed = time.perf_counter() - started - extracted
    plan = decide(profile.to_dict(), similarity.to_dict(), thresholds, defaults, base_epochs=cfg.epochs,
                  forced=cfg.scenario, freeze_groups=cfg.freeze_groups, backbone_lr_mult=cfg.backbone_lr_mult,
                  aug_views=cfg.aug_views, pretrained=backbone.weights_source != "none")
    groups = plan_groups(backbone.model, plan, cfg.lr)
    timings = {"features_s": round(extracted, 2), "features_cached": not feats.extracted, "probe_s": round(probed, 2)}
    return Decision(profile, similarity, plan, groups, len(feats.labels), timings)


def with_plan(decision: Decision, plan: Plan, model: nn.Module, head_lr: float) -> Decision:
    """The same measurements with another plan (bench baselines, tests)."""
    return dataclasses.replace(decision, plan=plan, groups=plan_groups(model, plan, head_lr))


# --- execution -----------------------------------------------------------------------------------

def _head_on_features(cfg: TrainConfig, backbone: Backbone, splits: FolderSplits, plan: Plan, stage: str,
                      epochs: int, aug_views: int, logger: Any, rt: runtime.Runtime | None) -> HeadResult:
    kwargs = _feature_kwargs(cfg, rt)
    train = cached_features(backbone, splits.train, **kwargs)
    views = [train.arrays[stage]]
    if aug_views:
        aug = cached_features(backbone, splits.train, views=aug_views, aug_preset=plan.augment, seed=cfg.seed, **kwargs)
        views.append(aug.arrays[stage])
    val = cached_features(backbone, splits.val, **kwargs)

    def factory(groups: list[dict[str, Any]], module: nn.Module):
        return make_optimizer_factory(cfg, [{**g, "lr": cfg.lr} for g in groups])(module)

    return fit_linear_head(views, train.labels, train.valid, val.arrays[stage], val.labels, val.valid,
                           len(splits.classes), plan.weight_decay_grid, epochs, cfg.batch_size, factory,
                           seed=cfg.seed, logger=logger, rt=kwargs["rt"])


def head_network(backbone: Backbone, plan: Plan, num_classes: int) -> nn.Module:
    """The network a feature plan saves: the timm model itself, or the model cut after a stage."""
    if plan.head_stage == FINAL:
        return backbone.model
    stage_index = int(plan.head_stage.removeprefix("stage"))
    # A copy: StageClassifier prunes the later stages in place, and the backbone still serves the
    # feature cache (its weights are part of the cache key).
    return StageClassifier(copy.deepcopy(backbone.model), stage_index, num_classes)


def fit_on_features(cfg: TrainConfig, decision: Decision, backbone: Backbone, splits: FolderSplits,
                    logger: Any = False, rt: runtime.Runtime | None = None
                    ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Small-data plans: train the linear head on cached features.

    Returns the network to save (with the trained head), the validation metrics, and what to report.
    """
    plan = decision.plan
    result = _head_on_features(cfg, backbone, splits, plan, plan.head_stage, plan.epochs, plan.aug_views, logger, rt)
    net = head_network(backbone, plan, len(splits.classes))
    classifier = net.head if isinstance(net, StageClassifier) else net.get_classifier()
    load_linear(classifier, result.weight, result.bias)
    val = cached_features(backbone, splits.val, **_feature_kwargs(cfg, rt))
    metrics = feature_metrics(val, plan.head_stage, result.weight, result.bias)
    metrics["best_epoch"] = result.best_epoch
    return net.eval(), metrics, {"weight_decay": result.weight_decay, "head_search": result.candidates}


def cached_center_probs(cfg: TrainConfig, backbone: Backbone, splits: FolderSplits, plan: Plan,
                        net: nn.Module, rt: runtime.Runtime | None = None) -> dict[str, np.ndarray]:
    """Validation probabilities of a feature plan's head on its cached centre-crop features (NaN rows
    for images that failed to decode): the after-training report needs no network pass for them."""
    val = cached_features(backbone, splits.val, **_feature_kwargs(cfg, rt))
    classifier = net.head if isinstance(net, StageClassifier) else net.get_classifier()
    x = torch.from_numpy(np.asarray(val.arrays[plan.head_stage][0], dtype=np.float32))
    with torch.no_grad():  # on the head's own device, wherever that is; the result on the CPU
        logits = classifier(x.to(runtime.module_device(classifier))).float().cpu()
    probs = logits.softmax(dim=1).numpy().astype(np.float64)
    probs[~val.valid] = np.nan
    return {"val": probs}


def feature_metrics(features: FeatureSet, stage: str, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, float]:
    """Accuracy, loss and top-5 of a linear head on cached features (valid images)."""
    x, y = features.matrix(stage)
    logits = F.linear(torch.from_numpy(x), weight, bias)
    target = torch.from_numpy(y)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {"val_acc": float((top[:, 0] == target).float().mean()),
            "val_loss": float(F.cross_entropy(logits, target)),
            "val_acc_top5": float((top == target[:, None]).any(dim=1).float().mean())}


def prepare_network(cfg: TrainConfig, decision: Decision, backbone: Backbone, splits: FolderSplits,
                    rt: runtime.Runtime | None = None, warm_up: bool = True
                    ) -> tuple[list[dict[str, Any]], list[Any], dict[str, Any]]:
    """Large-data plans: warm the head up on cached features, then freeze/unfreeze groups.

    `warm_up=False` skips fitting the head (the other ranks of a DDP run: they get rank 0's head when
    DDP wraps the model). Returns the optimizer's param groups, the Lightning callbacks, and what to report.
    """
    plan = decision.plan
    info: dict[str, Any] = {}
    if plan.warmup_epochs and warm_up:
        started = time.perf_counter()
        with preserved_rng():  # cached or not, the fine-tuning that follows starts from the same RNG state
            result = _head_on_features(cfg, backbone, splits, plan, FINAL, plan.warmup_epochs, 0, False, rt)
        load_linear(backbone.model.get_classifier(), result.weight, result.bias)
        info["warmup"] = {"val_acc": result.val_acc, "weight_decay": result.weight_decay,
                          "seconds": round(time.perf_counter() - started, 2)}
        log.info("Head warm-up on cached features: val acc %.4f", result.val_acc)
    param_groups, callback = apply_plan(backbone.model, decision.groups, plan.bn_policy)
    return param_groups, [callback], info


def group_table(model: nn.Module) -> list[dict[str, Any]]:
    """The model's layer groups (index, name, parameter count), as `finetune plan` lists them."""
    params = dict(model.named_parameters())
    return [{"index": g.index, "name": g.name, "params": sum(params[n].numel() for n in g.param_names),
             "head": g.is_head} for g in layer_groups(model)]


# --- `finetune plan` -----------------------------------------------------------------------------

def plan_folder(cfg: TrainConfig) -> tuple[Decision, list[dict[str, Any]]]:
    """Scan the folder, build the backbone, measure and decide: what `finetune plan` shows."""
    import pytorch_lightning as pl

    from finetune.backbone import create_backbone
    from finetune.data import scan_folder

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels)
    backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, keep_source_head=True)
    decision = measure_and_decide(cfg, splits, backbone)
    return decision, group_table(backbone.model)


def describe(decision: Decision, groups: list[dict[str, Any]]) -> str:
    """The decision as a readable report: profile, similarity, scenario, plan, layer groups."""
    p, s, plan = decision.profile, decision.similarity, decision.plan
    lines = ["Dataset profile",
             f"  images       train {p.n_train}, val {p.n_val}, test {p.n_test}, skipped {p.n_skipped}",
             f"  classes      {p.n_classes}; per class min {p.per_class_min}, median {p.per_class_median:g}, "
             f"max {p.per_class_max} (imbalance {p.imbalance_ratio:g}x)",
             f"  images look  {p.grayscale_share:.0%} grayscale, median size {p.median_width}x{p.median_height}",
             "",
             f"Domain similarity  {s.score:.3f}  (probe on {decision.probe_images} training images)"]
    for name, value in s.components.items():
        weight = s.weights.get(name, 0.0)
        lines.append(f"  {name:<18} {value:.3f}   weight {weight:g}")
    lines.append(f"  {'stage':<10} {'module':<28} {'channels':>8}  {'probe acc':>9}  {'normalised':>10}")
    for pr in s.probes:
        mark = "  <- best" if pr.key == s.best_stage else ""
        lines.append(f"  {pr.key:<10} {pr.module:<28} {pr.channels:>8}  {pr.balanced_accuracy:>9.3f}  "
                     f"{pr.normalized:>10.3f}{mark}")
    for k, v in s.details.items():
        if k.startswith(("source", "bn")):
            lines.append(f"  {k:<18} {v:.3f}")
    lines += ["", f"Scenario  {plan.scenario}  ({plan.source})"]
    lines += [f"  - {r}" for r in plan.reasons]
    lines += ["", "Plan",
              f"  head on        {plan.head_stage}" + ("  (cached features)" if plan.train_on_features else ""),
              f"  epochs         {plan.epochs}" + (f" after {plan.warmup_epochs} head warm-up epochs on cached features"
                                                   if plan.warmup_epochs else ""),
              f"  BatchNorm      {BN_POLICIES[plan.bn_policy]}"]
    if plan.train_on_features:
        lines.append(f"  weight decay   chosen on val from {plan.weight_decay_grid}")
        if plan.aug_views:
            lines.append(f"  aug views      {plan.aug_views} per image ({plan.augment})")
    lines += ["", "Layer groups (timm group_matcher; --freeze-groups N freezes the first N)",
              f"  {'#':>3}  {'group':<34} {'params':>10}  {'state':<8} {'lr':>9}"]
    settings = {g.index: g for g in decision.groups}
    for g in groups:
        st = settings.get(g["index"])
        if st is None:
            continue
        state = "frozen" if st.frozen else "learns"
        lr = "" if st.frozen else f"{st.lr:.2e}"
        lines.append(f"  {g['index']:>3}  {g['name'][:34]:<34} {g['params']:>10,}  {state:<8} {lr:>9}")
    return "\n".join(lines)
