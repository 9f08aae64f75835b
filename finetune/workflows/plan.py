"""`finetune plan`: scan, measure and decide (with the pilot where the signals are unclear), without
training the final model; what `plan` shows and `train` would run."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from finetune.config import TrainConfig
from finetune.data.folders import FolderSplits, read_exclude_list, scan_folder
from finetune.model.backbone import create_backbone
from finetune.strategy.measure import Decision, measure_and_decide, process_runtime
from finetune.workflows import pilot
from finetune.workflows.audit import audit_or_note, default_output
from finetune.strategy.report import group_table
from finetune.training.recipe import check_feature_plan_options, check_selection_option
from finetune.workflows.preflight import check_forced_scenario


def plan_folder(cfg: TrainConfig) -> tuple[Decision, list[dict[str, Any]]]:
    """Scan the folder, build the backbone, measure and decide: the decision `finetune plan` shows."""
    decision, groups, _, _ = _plan(cfg)
    return decision, groups


def plan_and_audit(cfg: TrainConfig) -> tuple[Decision, list[dict[str, Any]], dict[str, Any]]:
    """What `finetune plan` shows: the decision, the layer groups, and the audit (audit.json's content,
    from the features the measurement cached; {"skipped": why} when it could not run)."""
    decision, groups, splits, weights_source = _plan(cfg)
    return decision, groups, audit_or_note(cfg, splits, default_output(cfg), weights_source)


def _plan(cfg: TrainConfig) -> tuple[Decision, list[dict[str, Any]], FolderSplits, str]:
    check_forced_scenario(cfg)  # `plan` takes train's options: it refuses what train would refuse
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels,
                         exclude=read_exclude_list(cfg.exclude), multi_label=True)
    backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, keep_source_head=True)
    rt = process_runtime(cfg)
    decision = pilot.settle(cfg, measure_and_decide(cfg, splits, backbone, rt), backbone, splits, rt)
    if decision.plan.train_on_features:
        check_feature_plan_options(cfg, decision.plan.scenario)
        check_selection_option(cfg, decision.plan.scenario, piloted=decision.pilot is not None)
    return decision, group_table(backbone.model), splits, backbone.weights_source
