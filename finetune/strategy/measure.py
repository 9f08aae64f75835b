"""Measure, then decide: profile the data, run the frozen backbone once over the training images
(cached), measure the similarity, and call the pure decision (`finetune.strategy.decide`). The plan
it returns is executed by `finetune.training.run_plan`; `finetune plan` reports it
(`finetune.strategy.report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.model.backbone import Backbone, resolve_data_config
from finetune.config import TrainConfig
from finetune.data.folders import FolderSplits
from finetune import runtime, timing
from finetune.model.features import FeatureSet, cached_features_many
from finetune.strategy.groups import GroupSetting, plan_groups
from finetune.data.profile import DatasetProfile, profile_splits, stratified_subset
from finetune.strategy.similarity import Similarity, measure, not_measured
from finetune.strategy.decide import (SCENARIO_NAMES, Plan, decide, load_scenario_defaults, load_thresholds)

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
    pilot: dict[str, Any] | None = None  # where the signals were unclear: the candidates, their scores, the cost

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.plan.scenario, "plan": self.plan.to_dict(), "profile": self.profile.to_dict(),
                "similarity": self.similarity.to_dict(), "groups": [dataclasses.asdict(g) for g in self.groups],
                "probe_images": self.probe_images, "timings": self.timings, "pilot": self.pilot}

    def params(self) -> dict[str, Any]:
        """The flat numbers worth a column in MLflow (params)."""
        p = self.plan
        return {"scenario": p.scenario, "plan_source": p.source, "profile": self.profile.to_dict(),
                "similarity": {"score": self.similarity.score, **self.similarity.components,
                               "best_stage": self.similarity.best_stage},
                "plan": {"head_stage": p.head_stage, "train_on_features": p.train_on_features,
                         "frozen_groups": sum(1 for g in self.groups if g.frozen),
                         "backbone_lr_mult": p.backbone_lr_mult, "layer_decay": p.layer_decay,
                         "epochs": p.epochs, "head_warmup_epochs": p.head_warmup_epochs, "aug_views": p.aug_views}}


def process_runtime(cfg: TrainConfig) -> runtime.Runtime:
    """This process's runtime for `cfg` (`train` passes the one it configured)."""
    return runtime.resolve(cfg.accelerator, cfg.devices, cfg.strategy, cfg.precision, cfg.num_workers)


def _feature_kwargs(cfg: TrainConfig, rt: runtime.Runtime | None) -> dict[str, Any]:
    return dict(batch_size=cfg.batch_size, max_pixels=cfg.max_image_pixels, rt=rt or process_runtime(cfg))


def train_features(cfg: TrainConfig, backbone: Backbone, splits: FolderSplits, limit: int | None = None,
                   rt: runtime.Runtime | None = None) -> FeatureSet:
    return train_features_many(cfg, [backbone], splits, limit, rt)[0]


def train_features_many(cfg: TrainConfig, backbones: list[Backbone], splits: FolderSplits, limit: int | None = None,
                        rt: runtime.Runtime | None = None) -> list[FeatureSet]:
    """The cached features of the training split (a stratified subset of at most `limit` images) of each backbone,
    those not cached extracted in one pass (`finetune rank`)."""
    samples = splits.train if limit is None else stratified_subset(splits.train, limit)
    return cached_features_many(backbones, samples, **_feature_kwargs(cfg, rt))


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


def image_size(backbone: Backbone) -> int:
    return int(backbone.data_config["input_size"][-1])


def native_backbone(backbone: Backbone) -> Backbone:
    """The backbone with its weights' own preprocessing (input size), or itself when training uses it.

    The source classifier's confidence and the BatchNorm match compare the images with the pretraining
    data as the network saw it, at this size (`finetune.strategy.similarity`).
    """
    native = resolve_data_config(backbone.model)
    if native["input_size"] == list(backbone.data_config["input_size"]):
        return backbone
    return dataclasses.replace(backbone, data_config=native)


@timing.timed("measure")
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
    if splits.multi_label:  # the probes take one label per image: nothing measured (`decide`, multi_label)
        similarity = not_measured("several labels per image")
        plan = decide(profile.to_dict(), similarity.to_dict(), thresholds, defaults, base_epochs=cfg.epochs,
                      forced=cfg.scenario, freeze_groups=cfg.freeze_groups, backbone_lr_mult=cfg.backbone_lr_mult,
                      aug_views=cfg.aug_views, weight_decay=cfg.weight_decay,
                      pretrained=backbone.weights_source != "none", multi_label=True)
        return Decision(profile, similarity, plan, plan_groups(backbone.model, plan, cfg.lr), 0, {})
    started = time.perf_counter()
    feats = train_features(cfg, backbone, splits, thresholds.probe_max_images, rt)
    native = native_backbone(backbone) if backbone.weights_source != "none" else backbone  # random init: no source
    # A forced scenario only reports what the measurements say: no second pass at the weights' own size for it.
    skip_source = native is not backbone and cfg.scenario != "auto"
    if skip_source:
        native = backbone
    source = None if native is backbone else train_features(cfg, native, splits, thresholds.source_max_images, rt)
    extracted = time.perf_counter() - started
    similarity = measure(feats, thresholds.similarity_weights, thresholds.probe_folds, thresholds.probe_alpha,
                         source=source)
    similarity.details.update(image_size=image_size(backbone), source_image_size=image_size(native),
                              source_skipped_forced=skip_source)
    probed = time.perf_counter() - started - extracted
    plan = decide(profile.to_dict(), similarity.to_dict(), thresholds, defaults, base_epochs=cfg.epochs,
                  forced=cfg.scenario, freeze_groups=cfg.freeze_groups, backbone_lr_mult=cfg.backbone_lr_mult,
                  aug_views=cfg.aug_views, weight_decay=cfg.weight_decay, pretrained=backbone.weights_source != "none")
    groups = plan_groups(backbone.model, plan, cfg.lr)
    timings = {"features_s": round(extracted, 2), "features_cached": not feats.extracted, "probe_s": round(probed, 2),
               "images_per_s": round(feats.images_per_s, 2) if feats.images_per_s else None}
    return Decision(profile, similarity, plan, groups, len(feats.labels), timings)


def plan_for(decision: Decision, scenario: str, cfg: TrainConfig) -> Plan:
    """The plan of `scenario` on the same measurements, with the user's overrides (a pilot's candidate)."""
    defaults = {name: load_scenario_defaults(name) for name in SCENARIO_NAMES}
    return decide(decision.profile.to_dict(), decision.similarity.to_dict(), load_thresholds(), defaults,
                  base_epochs=cfg.epochs, forced=scenario, freeze_groups=cfg.freeze_groups,
                  backbone_lr_mult=cfg.backbone_lr_mult, aug_views=cfg.aug_views, weight_decay=cfg.weight_decay)


def with_plan(decision: Decision, plan: Plan, model: nn.Module, head_lr: float) -> Decision:
    """The same measurements with another plan (bench baselines, tests)."""
    return dataclasses.replace(decision, plan=plan, groups=plan_groups(model, plan, head_lr))


# --- execution -----------------------------------------------------------------------------------


# --- `finetune plan` -----------------------------------------------------------------------------


