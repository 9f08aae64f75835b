"""`train(cfg)`: scan data, build the backbone, fine-tune with Lightning, track in MLflow.

The CLI only parses options into a TrainConfig and calls this; tests call it directly too.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import MLFlowLogger

from finetune import evaluate, registry, tracking
from finetune.artifact import ModelSpec, save_model
from finetune.augment import eval_transform, make_mixup, resize_size, train_transform
from finetune.backbone import create_backbone
from finetune.callbacks import EMACallback, check_initial_loss, initial_loss, recipe_callbacks
from finetune.config import TrainConfig
from finetune.data import FolderDataModule, FolderSplits, scan_folder
from finetune.errors import UserError
from finetune.module import Classifier
from finetune.optim import make_optimizer_factory
from finetune.recipe import balanced_sampler_factory, class_weights, init_head, model_kwargs, resolve_recipe

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision on a GPU that supports it, full precision on CPU."""
    use_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if use_gpu and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "16-mixed" if use_gpu else "32-true"


def dataset_params(splits: FolderSplits) -> dict[str, Any]:
    return {"layout": splits.layout, **splits.counts()}


def run_name_for(cfg: TrainConfig) -> str:
    data_name = Path(cfg.data_dir).resolve().name
    return cfg.run_name or f"{cfg.model.split('.')[0]}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def recipe_scenario(cfg: TrainConfig) -> str:
    """The scenario whose default recipe applies.

    Until the plan (strategy issue) measures the scenario, `auto` trains the full network, which is
    the large-similar cell of the table, so it gets that cell's recipe.
    """
    return "large-similar" if cfg.scenario == "auto" else cfg.scenario


def train(cfg: TrainConfig, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Fine-tune and return the summary (also written to OUTPUT/summary.json).

    Args:
        cfg: the resolved config.
        tags: extra MLflow run tags (a sweep sets ``mlflow.parentRunId`` to nest its trials).
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels)
    if cfg.batch_size > len(splits.train):
        raise UserError(f"batch_size {cfg.batch_size} is larger than the training split "
                        f"({len(splits.train)} images). Use --batch-size {len(splits.train)} or less.")
    recipe = resolve_recipe(cfg, recipe_scenario(cfg))
    backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, **model_kwargs(recipe))
    init_head(backbone.model, recipe.drop_connect)
    run_name = run_name_for(cfg)
    output = Path(cfg.output or Path("outputs") / run_name)
    output.mkdir(parents=True, exist_ok=True)

    experiment_id = tracking.ensure_experiment(cfg.experiment)
    run = tracking.client().create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    log.info("MLflow run %s (experiment %r) at %s", run_id, cfg.experiment, tracking.tracking_uri())
    tracking.log_params(run_id, {"config": {k: v for k, v in cfg.to_dict().items() if k != "extra"},
                                 "model": backbone.model_name, "weights_source": backbone.weights_source,
                                 "data": dataset_params(splits), "data_config": backbone.data_config,
                                 "recipe": recipe.to_dict()})
    tracking.log_dict(run_id, cfg.to_dict(), "config.json")
    tracking.log_dict(run_id, {"classes": splits.classes}, "classes.json")
    tracking.log_dict(run_id, {"count": len(splits.skipped),
                               "files": [{"path": s.path, "reason": s.reason} for s in splits.skipped]},
                      "skipped_files.json")
    tracking.write_json(output / "config.json", cfg.to_dict())

    data_config = backbone.data_config
    size = resize_size(data_config)
    datamodule = FolderDataModule(
        splits, train_transform(data_config, recipe.augment), eval_transform(data_config),
        batch_size=cfg.batch_size, num_workers=cfg.num_workers, max_pixels=cfg.max_image_pixels,
        draft_size=(size, size),
        sampler_factory=balanced_sampler_factory(len(splits.classes)) if cfg.sampler == "balanced" else None)
    lr, wd = cfg.lr, cfg.weight_decay
    param_groups = [{"params": list(backbone.model.parameters()), "lr": lr, "name": "all"}]
    module = Classifier(
        backbone.model, len(splits.classes),
        make_optimizer_factory(cfg, param_groups, recipe.schedule, recipe.warmup_epochs),
        class_weights=class_weights([s.label for s in splits.train], len(splits.classes))
        if cfg.class_weights == "auto" else None,
        label_smoothing=recipe.label_smoothing,
        mixup=make_mixup(recipe.mixup, recipe.cutmix, recipe.label_smoothing, len(splits.classes)))

    checkpoint = ModelCheckpoint(dirpath=output / "checkpoints", filename="best", monitor="val_acc", mode="max",
                                 save_last=True, save_weights_only=False)
    logger = MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=tracking.tracking_uri(), run_id=run_id)
    trainer = pl.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=_devices(cfg.devices), strategy=cfg.strategy,
        precision=cfg.precision or default_precision(cfg.accelerator), logger=logger,
        callbacks=[checkpoint, TQDMProgressBar(refresh_rate=1),
                   *recipe_callbacks(cfg, recipe, len(splits.classes), checkpoint, output)],
        default_root_dir=output, log_every_n_steps=1, num_sanity_val_steps=0, enable_model_summary=False)
    _babysit_initial_loss(module, datamodule, len(splits.classes), run_id)
    try:
        trainer.fit(module, datamodule=datamodule)
    except UserError:  # divergence: the run is marked failed, the message says which checkpoint is good
        tracking.client().set_terminated(run_id, "FAILED")
        raise

    best_path = checkpoint.best_model_path or checkpoint.last_model_path
    state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    # A logger-less trainer: the final numbers go to MLflow as final_*, not as an extra epoch point.
    evaluator = pl.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_checkpointing=False,
                           enable_model_summary=False, precision=trainer.precision)
    val_metrics = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    metrics = {"val_acc": float(val_metrics["val_acc"]), "val_loss": float(val_metrics["val_loss"]),
               "val_acc_top5": float(val_metrics["val_acc_top5"]), "best_epoch": int(torch.load(
                   best_path, map_location="cpu", weights_only=True)["epoch"])}
    metrics = _keep_better_of_raw_and_ema(module, evaluator, datamodule, trainer, metrics)

    spec = ModelSpec(architecture=backbone.model_name.split(".")[0], num_classes=len(splits.classes),
                     class_names=splits.classes, data_config=data_config, create_kwargs=backbone.create_kwargs,
                     weights_source=backbone.weights_source, default_tta=cfg.tta)
    model_dir = save_model(output / "model", module.net, spec)
    metrics.update(evaluate.after_training(module.net, spec, splits, cfg, run_id, output))  # TTA + report
    summary = {
        "scenario": "full-finetune",
        "plan": {"frozen": [], "lr": lr, "weight_decay": wd, "epochs": cfg.epochs},
        "recipe": recipe.to_dict(),
        "metrics": metrics,
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": tracking.tracking_uri(),
        "experiment": cfg.experiment,
        "classes": splits.classes,
        "data": dataset_params(splits),
        "skipped_files": [s.path for s in splits.skipped],
        "model_dir": str(model_dir.resolve()),
        "output": str(output.resolve()),
        "wall_time_s": round(time.time() - started, 1),
    }
    summary.update(registry.publish(run_id, model_dir, summary, cfg.tta, cfg.register, cfg.max_image_pixels))
    tracking.write_json(output / "summary.json", summary)
    c = tracking.client()
    for name, value in metrics.items():
        if isinstance(value, (int, float)):
            c.log_metric(run_id, f"final_{name}", value)
    tracking.log_artifact(run_id, model_dir, "model_files")
    tracking.log_artifact(run_id, output / "summary.json")
    c.set_terminated(run_id, "FINISHED")
    return summary


def _babysit_initial_loss(module: Classifier, datamodule: FolderDataModule, num_classes: int, run_id: str) -> None:
    """Before training: a fresh head should start at a loss of about ln(C); warn with numbers if not."""
    loss = initial_loss(module.net, datamodule.val_dataloader())
    tracking.client().log_metric(run_id, "initial_loss", loss)
    warning = check_initial_loss(loss, num_classes)
    if warning:
        log.warning(warning)


def _keep_better_of_raw_and_ema(module: Classifier, evaluator: pl.Trainer, datamodule: FolderDataModule,
                                trainer: pl.Trainer, metrics: dict[str, Any]) -> dict[str, Any]:
    """With --ema: validate the best EMA weights too, and keep (in `module`) whichever is better."""
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMACallback)), None)
    metrics = {**metrics, "weights": "raw"}
    if ema is None or not ema.best_path.is_file():
        return metrics
    raw_state = {k: v.clone() for k, v in module.net.state_dict().items()}
    module.net.load_state_dict(torch.load(ema.best_path, map_location="cpu", weights_only=True)["state_dict"])
    ema_metrics = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    metrics["val_acc_raw"] = metrics["val_acc"]
    metrics["val_acc_ema"] = float(ema_metrics["val_acc"])
    if metrics["val_acc_ema"] > metrics["val_acc"]:
        log.info("EMA weights validate better (%.4f > %.4f): keeping them", metrics["val_acc_ema"], metrics["val_acc"])
        return {**metrics, "val_acc": metrics["val_acc_ema"], "val_loss": float(ema_metrics["val_loss"]),
                "val_acc_top5": float(ema_metrics["val_acc_top5"]), "weights": "ema"}
    module.net.load_state_dict(raw_state)
    return metrics


def _devices(devices: str) -> Any:
    if devices == "auto":
        return "auto"
    try:
        return int(devices)
    except ValueError:
        return devices  # "0,1" style lists are understood by Lightning
