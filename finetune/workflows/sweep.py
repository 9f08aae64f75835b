"""`finetune sweep`: hyperparameter search with Optuna, each trial a child MLflow run of one parent.

Searches only what acts in the plan it tunes, decided once up front as `finetune plan` does
(`search_space`). A fine-tuning plan: the learning rate and weight decay on log scales (their effect is
multiplicative, so a uniform draw over orders of magnitude beats a grid), and optionally the
augmentation preset. A feature plan (a linear head on frozen, cached features): the learning rate only;
its head picks the weight decay by cross-validation on train from the plan's grid inside every trial,
and no image is augmented per step. The best trial's configuration is saved as a YAML file that `finetune train
--config` takes as it is.
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
from finetune.files import atomic_write
from finetune.training.callbacks import DivergenceError
from finetune.config import AUGMENT_PRESETS, TrainConfig
from finetune.errors import UserError
from finetune.strategy.decide import Plan

log = logging.getLogger(__name__)

# Keys that describe where/how a run is stored, not how it trains: left out of the best config.
_NOT_RECIPE = ("data_dir", "output", "run_name", "register")
DEFAULT_LR_RANGE = (1e-5, 1e-1)
DEFAULT_WD_RANGE = (1e-6, 1e-1)


def search_space(plan: Plan, lr_range: tuple[float, float] = DEFAULT_LR_RANGE,
                 wd_range: tuple[float, float] | None = None, search_augment: bool = False
                 ) -> dict[str, tuple[Any, ...]]:
    """What a sweep searches for `plan`: name -> ("log", low, high) or ("choice", values).

    Args:
        wd_range: the user's --wd-range (None: not given; a fine-tuning plan then searches DEFAULT_WD_RANGE).
        search_augment: the user's --search-augment.
    Raises UserError when the user asks a feature plan for a search that would not act on it.
    """
    check_ranges(lr_range, wd_range)
    space: dict[str, tuple[Any, ...]] = {"lr": ("log", *lr_range)}
    if plan.train_on_features:
        asked = [flag for flag, given in (("--wd-range", wd_range is not None), ("--search-augment", search_augment))
                 if given]
        if asked:
            raise UserError(f"{', '.join(asked)}: the plan {plan.scenario} is a feature plan (a linear head on "
                            "frozen, cached features): its head chooses the weight decay by cross-validation on "
                            "train from the plan's grid in every trial, and it augments no image per step, so the "
                            "sweep searches the learning rate only. Leave them out, or force a fine-tuning plan with "
                            "--scenario large-similar or --scenario large-different.")
        return space
    space["weight_decay"] = ("log", *(wd_range or DEFAULT_WD_RANGE))
    if search_augment:
        space["augment"] = ("choice", tuple(AUGMENT_PRESETS))
    return space


def check_ranges(lr_range: tuple[float, float], wd_range: tuple[float, float] | None) -> None:
    for name, (lo, hi) in (("lr", lr_range), ("weight decay", wd_range or DEFAULT_WD_RANGE)):
        if not 0 < lo < hi:
            raise UserError(f"The {name} range must be positive and increasing (got {lo} .. {hi}).")


def _suggest(trial: optuna.Trial, space: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, (kind, *spec) in space.items():
        if kind == "log":
            params[name] = trial.suggest_float(name, spec[0], spec[1], log=True)
        else:
            params[name] = trial.suggest_categorical(name, list(spec[0]))
    return params


def best_config(cfg: TrainConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The YAML mapping for `--config`: the sweep's config with the best trial's values."""
    values = {k: v for k, v in replace(cfg, **params).to_dict().items() if k not in _NOT_RECIPE}
    return values


def sweep(cfg: TrainConfig, trials: int, lr_range: tuple[float, float] = DEFAULT_LR_RANGE,
          wd_range: tuple[float, float] | None = None, search_augment: bool = False) -> dict[str, Any]:
    """Run `trials` Optuna trials of `train` over `search_space` of the data's plan; return the best value,
    params and config path. `wd_range` None: not given (see `search_space`)."""
    from finetune.workflows.plan import plan_folder
    from finetune.workflows.train import train

    if trials < 1:
        raise UserError(f"--trials must be at least 1 (got {trials}).")
    check_ranges(lr_range, wd_range)  # before the measurement
    # The plan every trial will run (its features are cached for them); it refuses what train would refuse.
    decision = plan_folder(replace(cfg, register=None))[0]  # --register acts on the best trial, at the end
    if "not_measured" in decision.similarity.details:  # several labels per image (`similarity.not_measured`)
        raise UserError("finetune sweep maximises the selection accuracy of one label per image; for several labels "
                        "per image use finetune train.")
    plan = decision.plan
    space = search_space(plan, lr_range, wd_range, search_augment)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.run_name or f"sweep-{Path(cfg.data_dir).resolve().name}-{stamp}"
    output = Path(cfg.output or Path("outputs") / name)
    output.mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.ensure_experiment(cfg.experiment)
    parent = tracking.client().create_run(experiment_id, run_name=name, tags={"finetune.command": "sweep"})
    parent_id = parent.info.run_id
    tracking.log_params(parent_id, {"trials": trials, "scenario": plan.scenario, "model": cfg.model,
                                    "epochs": cfg.epochs,
                                    **{f"space.{k}": "..".join(str(v) for v in spec[1:]) if spec[0] == "log"
                                       else ",".join(spec[1]) for k, spec in space.items()}})
    log.info("Sweeping %s for the %s plan", ", ".join(space), plan.scenario)

    def objective(trial: optuna.Trial) -> float:
        params = _suggest(trial, space)
        trial_cfg = replace(cfg, **params, run_name=f"{name}-trial{trial.number}",
                            output=str(output / f"trial-{trial.number}"), register=None)
        try:
            summary = train(trial_cfg, tags={"mlflow.parentRunId": parent_id, "sweep.trial": str(trial.number)})
        except DivergenceError as e:  # a diverging LR is a result (a bad one), not the end of the sweep
            log.warning("Trial %d diverged: %s", trial.number, e.message)
            trial.set_user_attr("diverged", True)
            return 0.0
        trial.set_user_attr("mlflow_run_id", summary["mlflow_run_id"])
        trial.set_user_attr("val_acc", summary["metrics"]["val_acc"])  # reported, never ranked on
        # Trials are ranked on data inside train (the selection split or cross-validation): val only reports.
        return float(summary["metrics"]["select_acc"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    try:
        study.optimize(objective, n_trials=trials)
        return _finish(cfg, study, parent_id, output)
    except BaseException as e:  # the parent run never stays RUNNING (an interruption ends it KILLED)
        tracking.end_run_if_running(parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def _finish(cfg: TrainConfig, study: optuna.Study, parent_id: str, output: Path) -> dict[str, Any]:
    """The best trial's config file, its numbers on the parent run, and every trial's row."""
    best = study.best_trial
    config_path = output / "best_config.yaml"
    with atomic_write(config_path) as f:
        f.write(yaml.safe_dump(best_config(cfg, best.params), sort_keys=False))
    c = tracking.client()
    c.log_metric(parent_id, "best_select_acc", float(best.value))
    c.log_metric(parent_id, "best_trial_val_acc", float(best.user_attrs.get("val_acc", float("nan"))))
    for key, value in best.params.items():
        c.set_tag(parent_id, f"best.{key}", str(value))
    tracking.log_artifact(parent_id, config_path)
    rows = [{"trial": t.number, **t.params, "select_acc": t.value, **t.user_attrs} for t in study.trials]
    tracking.write_json(output / "trials.json", rows)
    tracking.log_artifact(parent_id, output / "trials.json")
    result = {"best_select_acc": float(best.value), "best_val_acc": best.user_attrs.get("val_acc"),
              "best_params": best.params, "best_trial": best.number, "best_config": str(config_path.resolve()),
              "trials": rows, "mlflow_run_id": parent_id}
    if cfg.register:
        result["registered_model"] = register_best(cfg.register, best, parent_id)
        c.set_tag(parent_id, "registered_model", f"{cfg.register}/{result['registered_model']['version']}")
    c.set_terminated(parent_id, "FINISHED")
    return result


def register_best(name: str, best: optuna.trial.FrozenTrial, parent_id: str) -> dict[str, str]:
    """`--register NAME`: the best trial's model, registered as `train --register NAME` registers a run's."""
    from finetune.tracking import registry

    run_id = best.user_attrs.get("mlflow_run_id")
    if run_id is None:  # the best "trial" diverged, so every trial did
        raise UserError(f"--register {name}: no trial produced a model (every trial diverged); nothing registered. "
                        "Try a lower --lr-range.")
    tags = {"training_run_id": run_id, "sweep_run_id": parent_id, "sweep_trial": str(best.number),
            "metric.select_acc": f"{best.value:.6g}", "metric.val_acc": f"{best.user_attrs.get('val_acc', '')}"}
    return {"name": name, "version": registry.register(f"runs:/{run_id}/model", name, tags)}
