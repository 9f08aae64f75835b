"""Checks that run before any work: a wrong option fails in seconds, not after the data scan,
the model build or an MLflow run was made."""

from __future__ import annotations

import warnings

from finetune.training import distributed
from finetune import tracking
from finetune.model.backbone import check_model_name
from finetune.config import TrainConfig
from finetune.errors import UserError
from finetune.strategy.decide import SCENARIO_NAMES, load_scenario_defaults
from finetune.training.recipe import check_feature_plan_options, check_selection_option


def check(cfg: TrainConfig, devices, precision: str) -> None:
    """Raise UserError for an unknown model, recipe options a forced feature plan ignores, Lightning options
    it would refuse, or an unreachable store."""
    if cfg.model == "auto":  # chosen by `finetune rank`'s ranking of --candidates (workflows/rank.py)
        if not cfg.candidates:
            raise UserError("--model auto chooses among --candidates: pass them (timm names separated by commas, a "
                            "folder of weight files with sidecars, or a file listing them), or name one --model.")
    else:
        check_model_name(cfg.model)
        given = [flag for flag, value in (("--candidates", cfg.candidates), ("--max-latency-ms", cfg.max_latency_ms))
                 if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} choose the backbone with --model auto; with --model {cfg.model} "
                            "they would do nothing. Pass --model auto, or leave them out.")
    check_forced_scenario(cfg)
    check_lightning_options(cfg.accelerator, devices, cfg.strategy, precision, cfg.num_nodes)
    if distributed.is_global_zero():
        tracking.check_reachable()


def check_lightning_options(accelerator: str, devices, strategy: str, precision: str, num_nodes: int = 1) -> None:
    """Let Lightning itself judge accelerator/devices/strategy/precision: building a Trainer is cheap
    and launches nothing (DDP processes start only in `fit`)."""
    import pytorch_lightning as pl

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
                       num_nodes=num_nodes,
                       logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False)
    except Exception as e:  # MisconfigurationException, ValueError, ...: Lightning names the valid values
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Invalid --accelerator/--devices/--strategy/--precision "
                        f"({accelerator}/{devices}/{strategy}/{precision}): {first}") from None


def check_forced_scenario(cfg: TrainConfig) -> None:
    """A forced small-* scenario is a feature plan whatever the data: refuse the recipe options it would
    ignore now, before the data scan and the measurement (a measured one is checked after the decision)."""
    if cfg.scenario in SCENARIO_NAMES and load_scenario_defaults(cfg.scenario).train_on_features:
        check_feature_plan_options(cfg, cfg.scenario)
        check_selection_option(cfg, cfg.scenario, piloted=False)  # a forced scenario is never piloted
