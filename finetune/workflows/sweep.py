"""`finetune sweep`: hyperparameter search with Optuna, each trial a child MLflow run of one parent.

Searches the learning rate and weight decay on log scales (their effect is multiplicative, so a
uniform draw over orders of magnitude beats a grid), and optionally the augmentation preset. The best
trial's configuration is saved as a YAML file that `finetune train --config` takes as it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import yaml

from finetune import tracking
from finetune.training.callbacks import DivergenceError
from finetune.config import AUGMENT_PRESETS, TrainConfig
from finetune.errors import UserError

log = logging.getLogger(__name__)

# Keys that describe where/how a run is stored, not how it trains: left out of the best config.
_NOT_RECIPE = ("data_dir", "output", "run_name", "register")


def best_config(cfg: TrainConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The YAML mapping for `--config`: the sweep's config with the best trial's values."""
    values = {k: v for k, v in replace(cfg, **params).to_dict().items() if k not in _NOT_RECIPE}
    return values


def sweep(cfg: TrainConfig, trials: int, lr_range: tuple[float, float] = (1e-5, 1e-1),
          wd_range: tuple[float, float] = (1e-6, 1e-1), search_augment: bool = False) -> dict[str, Any]:
    """Run `trials` Optuna trials of `train`; return the best value, params and config path."""
    from finetune.workflows.train import train

    if trials < 1:
        raise UserError(f"--trials must be at least 1 (got {trials}).")
    for name, (lo, hi) in (("lr", lr_range), ("weight decay", wd_range)):
        if not 0 < lo < hi:
            raise UserError(f"The {name} range must be positive and increasing (got {lo} .. {hi}).")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.run_name or f"sweep-{Path(cfg.data_dir).resolve().name}-{stamp}"
    output = Path(cfg.output or Path("outputs") / name)
    output.mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.ensure_experiment(cfg.experiment)
    parent = tracking.client().create_run(experiment_id, run_name=name, tags={"finetune.command": "sweep"})
    parent_id = parent.info.run_id
    tracking.log_params(parent_id, {"trials": trials, "lr_range": f"{lr_range[0]}..{lr_range[1]}",
                                    "weight_decay_range": f"{wd_range[0]}..{wd_range[1]}",
                                    "search_augment": search_augment, "model": cfg.model, "epochs": cfg.epochs})

    def objective(trial: optuna.Trial) -> float:
        params: dict[str, Any] = {
            "lr": trial.suggest_float("lr", *lr_range, log=True),
            "weight_decay": trial.suggest_float("weight_decay", *wd_range, log=True),
        }
        if search_augment:
            params["augment"] = trial.suggest_categorical("augment", list(AUGMENT_PRESETS))
        trial_cfg = replace(cfg, **params, run_name=f"{name}-trial{trial.number}",
                            output=str(output / f"trial-{trial.number}"), register=None)
        try:
            summary = train(trial_cfg, tags={"mlflow.parentRunId": parent_id, "sweep.trial": str(trial.number)})
        except DivergenceError as e:  # a diverging LR is a result (a bad one), not the end of the sweep
            log.warning("Trial %d diverged: %s", trial.number, e.message)
            trial.set_user_attr("diverged", True)
            return 0.0
        trial.set_user_attr("mlflow_run_id", summary["mlflow_run_id"])
        return float(summary["metrics"]["val_acc"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    try:
        study.optimize(objective, n_trials=trials)
    except BaseException:
        tracking.client().set_terminated(parent_id, "FAILED")
        raise
    best = study.best_trial
    config_path = output / "best_config.yaml"
    config_path.write_text(yaml.safe_dump(best_config(cfg, best.params), sort_keys=False))
    c = tracking.client()
    c.log_metric(parent_id, "best_val_acc", float(best.value))
    for key, value in best.params.items():
        c.set_tag(parent_id, f"best.{key}", str(value))
    tracking.log_artifact(parent_id, config_path)
    rows = [{"trial": t.number, **t.params, "val_acc": t.value, **t.user_attrs} for t in study.trials]
    tracking.write_json(output / "trials.json", rows)
    tracking.log_artifact(parent_id, output / "trials.json")
    c.set_terminated(parent_id, "FINISHED")
    return {"best_val_acc": float(best.value), "best_params": best.params, "best_trial": best.number,
            "best_config": str(config_path.resolve()), "trials": rows, "mlflow_run_id": parent_id}
