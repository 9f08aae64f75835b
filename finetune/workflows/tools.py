"""Babysitting the learning process: `finetune sanity` and `finetune lr-find`.

The lecture notes' checklist before a long run: the initial loss is ln(C) for a fresh head (checked
by `train` itself, see `finetune.training.callbacks.check_initial_loss`); the model can overfit a tiny subset
with regularization off (`sanity`); and a learning rate where the loss falls fastest (`lr-find`,
Lightning's learning-rate range test). `sanity` trains the whole network; `lr-find` tests what the
plan `train` would run (a feature plan's linear head on cached features, or the network with the plan's
groups) and suggests train's --lr.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from finetune.files import atomic_write
from finetune import runtime
from finetune import tracking
from finetune.data.transforms import eval_transform, resize_size, train_transform
from finetune.model.backbone import Backbone, create_backbone
from finetune.training.callbacks import initial_loss
from finetune.config import TrainConfig
from finetune.data.loaders import FolderDataModule
from finetune.data.folders import FolderSplits, Sample, read_exclude_list, scan_folder
from finetune.errors import UserError
from finetune.training.module import Classifier
from finetune.training.optim import make_optimizer_factory
from finetune.model.heads import init_head
from finetune.strategy.measure import Decision
from finetune.training.lr_range import read_curve, suggest_lr
from finetune.training.recipe import model_kwargs, resolve_recipe
from finetune.training.range_test import RangeTest, lr_range_test
from finetune.workflows.preflight import check_forced_scenario
from finetune.workflows.train import prepare_run, recipe_scenario

log = logging.getLogger(__name__)

SANITY_TARGET_ACC = 0.99


def _setup(cfg: TrainConfig, splits: FolderSplits, augment: str, regularize: bool,
           batch_size: int, rt: runtime.Runtime) -> tuple[Backbone, FolderDataModule, Classifier]:
    recipe = resolve_recipe(cfg, recipe_scenario(cfg))
    kwargs = model_kwargs(recipe) if regularize else {}
    backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, **kwargs)
    init_head(backbone.model, recipe.drop_connect if regularize else 0.0)
    data_config = backbone.data_config
    size = resize_size(data_config)
    datamodule = FolderDataModule(splits, train_transform(data_config, augment), eval_transform(data_config),
                                  batch_size=batch_size, num_workers=rt.workers, pin_memory=rt.pin_memory,
                                  max_pixels=cfg.max_image_pixels, draft_size=(size, size))
    groups = [{"params": list(backbone.model.parameters()), "lr": recipe.lr, "name": "all"}]
    factory = make_optimizer_factory(recipe, groups, "constant", 0.0)
    module = Classifier(backbone.model, len(splits.classes), factory,
                        label_smoothing=recipe.label_smoothing if regularize else 0.0)
    return backbone, datamodule, module


def one_device(cfg: TrainConfig) -> TrainConfig:
    """These checks run in one process on one device (their commands take no DDP options): what reads the
    config further down (the pilot's fits) must not start DDP on a machine with several GPUs either."""
    return dataclasses.replace(cfg, devices="1", strategy="auto", num_nodes=1)


def _runtime(cfg: TrainConfig) -> runtime.Runtime:
    return runtime.configure(cfg.accelerator, 1, "auto", cfg.precision, cfg.num_workers)


def _trainer(rt: runtime.Runtime, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(accelerator=rt.accelerator, devices=rt.lightning_devices, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                      precision=rt.precision, **kwargs)


def small_subset(samples: list[Sample], n: int) -> list[Sample]:
    """n samples taken round-robin over the classes, so every class is in the subset."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    picked: list[Sample] = []
    queues = [list(v) for _, v in sorted(by_class.items())]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def sanity(cfg: TrainConfig, samples: int = 20, epochs: int | None = None) -> dict[str, Any]:
    """Overfit `samples` training images with augmentation and regularization off.

    A model that cannot reach ~100% train accuracy on 20 images has a bug (labels, preprocessing,
    a frozen or broken network, an LR far off) that more data will not fix.
    """
    if samples < 2:
        raise UserError(f"--samples must be at least 2 (got {samples}).")
    cfg = one_device(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels,
                         exclude=read_exclude_list(cfg.exclude))
    subset = small_subset(splits.train, samples)
    # Train and validate on the same images, without augmentation: validation reads the train accuracy.
    tiny = replace(splits, train=subset, val=subset, test=[])
    no_reg = replace(cfg, weight_decay=0.0)
    batch = min(cfg.batch_size, len(subset))
    rt = _runtime(cfg)
    _, datamodule, module = _setup(no_reg, tiny, "none", regularize=False, batch_size=batch, rt=rt)
    start_loss = initial_loss(module.net, datamodule.val_dataloader(), rt)
    epochs = epochs or 30
    started = time.time()
    trainer = _trainer(rt, max_epochs=epochs, log_every_n_steps=1)  # minutes on a CPU: show progress
    trainer.fit(module, datamodule=datamodule)
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    acc = float(final["select_acc"])  # the validation loop's metrics; here it validates the training subset
    return {"samples": len(subset), "classes": len(splits.classes), "epochs": epochs, "lr": cfg.lr,
            "initial_loss": start_loss, "expected_initial_loss": math.log(len(splits.classes)),
            "final_loss": float(final["select_loss"]), "train_acc": acc, "target_acc": SANITY_TARGET_ACC,
            "passed": acc >= SANITY_TARGET_ACC, "wall_time_s": round(time.time() - started, 1)}


SUGGESTION_RULE = ("the LR at the steepest point (on the log-LR axis) of the last sustained descent before the "
                   "minimum of the smoothed loss, ignoring the first 10% of the curve")


def lr_find(cfg: TrainConfig, min_lr: float = 1e-6, max_lr: float = 1.0, num_training: int = 100) -> dict[str, Any]:
    """The LR range test of the plan `train` would run: plot (PNG + MLflow artifact) and the suggested --lr.

    The plan is decided first, as `train` decides it; a feature plan tests its linear head on the cached
    features (seconds), a network plan the network with the plan's groups, after the head warm-up
    (`range_test.lr_range_test`). The suggestion is `lr_range.suggest_lr`, not Lightning's `suggestion()`.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    if not 0 < min_lr < max_lr:
        raise UserError(f"--min-lr must be positive and below --max-lr (got {min_lr}, {max_lr}).")
    if num_training < 10:
        raise UserError(f"--num-training must be at least 10 (got {num_training}): the curve needs points to read.")
    check_forced_scenario(cfg)
    cfg = one_device(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    rt = _runtime(cfg)
    splits, decision, backbone, recipe = prepare_run(cfg, rt)
    output = Path(cfg.output or Path("outputs") / f"lr-find-{time.strftime('%Y%m%d-%H%M%S')}")
    output.mkdir(parents=True, exist_ok=True)
    test = RangeTest(min_lr, max_lr, num_training, output)
    finder, measured = lr_range_test(cfg, decision, recipe, backbone, splits, rt, test)
    if finder is None or len(finder.results.get("lr", [])) < 5:
        raise UserError("The LR range test returned no curve (the loss diverged at once?). Try a smaller --max-lr.")
    result = _range_result(finder, decision, measured, test)
    result["plot"] = str(_plot(finder, result, output / "lr_find.png").resolve())
    result["wall_time_s"] = round(time.time() - started, 1)
    result["mlflow_run_id"] = _log_lr_find(cfg, backbone, recipe, result, output)
    return result


def _range_result(finder: Any, decision: Decision, measured: dict[str, Any], test: RangeTest) -> dict[str, Any]:
    lrs = [float(x) for x in finder.results["lr"]]
    losses = [float(x) for x in finder.results["loss"]]  # Lightning's: already smoothed (fastai's EMA, beta 0.98)
    reading = read_curve(lrs, losses)
    finite_lrs = [x for x, y in zip(lrs, losses) if x > 0 and math.isfinite(y)]
    return {"suggested_lr": suggest_lr(lrs, losses), "suggestion_is": "train's --lr", "rule": SUGGESTION_RULE,
            "plan": decision.plan.scenario, "plan_source": decision.plan.source, **measured,
            "curve_min_lr": finite_lrs[reading.minimum] if reading else None,
            "descent_start_lr": finite_lrs[reading.descent_start] if reading else None,
            "lightning_suggestion": finder.suggestion(),
            "min_lr": test.min_lr, "max_lr": test.max_lr, "num_training": test.num_training, "steps": len(lrs),
            "lrs": lrs, "losses": losses}


def _plot(finder: Any, result: dict[str, Any], png: Path) -> Path:
    fig = finder.plot(suggest=False)
    ax = fig.axes[0]
    if result["curve_min_lr"] is not None:
        ax.axvline(result["curve_min_lr"], color="grey", linestyle=":", label=f"minimum {result['curve_min_lr']:.3g}")
    if result["suggested_lr"] is not None:
        ax.axvline(result["suggested_lr"], color="red", linestyle="--",
                   label=f"suggested --lr {result['suggested_lr']:.3g}")
    ax.set_title(f"plan {result['plan']}: {result['trains']}; LR of {result['lr_of']}", fontsize=8)
    ax.legend(fontsize=8)
    with atomic_write(png, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    return png


def _log_lr_find(cfg: TrainConfig, backbone: Backbone, recipe: Any, result: dict[str, Any], output: Path) -> str:
    """The MLflow run of an lr-find: which plan was measured, what the suggestion is for, the plot and curve."""
    experiment_id = tracking.ensure_experiment(cfg.experiment)
    run = tracking.client().create_run(experiment_id, run_name=cfg.run_name or f"lr-find-{output.name}",
                                       tags={"finetune.command": "lr-find", "finetune.plan": result["plan"]})
    run_id = run.info.run_id
    tracking.log_params(run_id, {"model": backbone.model_name, "weights_source": backbone.weights_source,
                                 "plan": result["plan"], "trains": result["trains"], "lr_of": result["lr_of"],
                                 "suggestion_is": result["suggestion_is"], "batch_size": cfg.batch_size,
                                 "optimizer": recipe.optimizer, "min_lr": result["min_lr"], "max_lr": result["max_lr"],
                                 "num_training": result["num_training"]})
    for key in ("suggested_lr", "curve_min_lr", "lightning_suggestion"):
        if result[key] is not None:
            tracking.client().log_metric(run_id, key, float(result[key]))
    tracking.log_artifact(run_id, Path(result["plot"]))
    tracking.write_json(output / "lr_find.json", result)
    tracking.log_artifact(run_id, output / "lr_find.json")
    tracking.client().set_terminated(run_id, "FINISHED")
    return run_id
