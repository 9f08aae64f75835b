"""Babysitting the learning process: `finetune sanity` and `finetune lr-find`.

The lecture notes' checklist before a long run: the initial loss is ln(C) for a fresh head (checked
by `train` itself, see `finetune.training.callbacks.check_initial_loss`); the model can overfit a tiny subset
with regularization off (`sanity`); and a learning rate where the loss falls fastest (`lr-find`,
Lightning's learning-rate range test). Both train the whole network (the full fine-tune path).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from finetune import runtime
from finetune import tracking
from finetune.data.transforms import eval_transform, resize_size, train_transform
from finetune.model.backbone import Backbone, create_backbone
from finetune.training.callbacks import initial_loss
from finetune.config import TrainConfig
from finetune.data.loaders import FolderDataModule
from finetune.data.folders import FolderSplits, Sample, scan_folder
from finetune.errors import UserError
from finetune.training.module import Classifier
from finetune.training.optim import make_optimizer_factory
from finetune.model.heads import init_head
from finetune.training.recipe import model_kwargs, resolve_recipe
from finetune.workflows.train import recipe_scenario

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


def _runtime(cfg: TrainConfig) -> runtime.Runtime:
    """One process on one device (these checks never run under DDP)."""
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
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels)
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
    acc = float(final["val_acc"])
    return {"samples": len(subset), "classes": len(splits.classes), "epochs": epochs, "lr": cfg.lr,
            "initial_loss": start_loss, "expected_initial_loss": math.log(len(splits.classes)),
            "final_loss": float(final["val_loss"]), "train_acc": acc, "target_acc": SANITY_TARGET_ACC,
            "passed": acc >= SANITY_TARGET_ACC, "wall_time_s": round(time.time() - started, 1)}


def lr_find(cfg: TrainConfig, min_lr: float = 1e-6, max_lr: float = 1.0, num_training: int = 100) -> dict[str, Any]:
    """Lightning's LR range test on the training recipe's data: plot (PNG + MLflow artifact) and suggestion."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    from pytorch_lightning.tuner import Tuner

    if not 0 < min_lr < max_lr:
        raise UserError(f"--min-lr must be positive and below --max-lr (got {min_lr}, {max_lr}).")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels)
    recipe = resolve_recipe(cfg, recipe_scenario(cfg))
    if cfg.batch_size > len(splits.train):
        raise UserError(f"batch_size {cfg.batch_size} is larger than the training split "
                        f"({len(splits.train)} images). Use --batch-size {len(splits.train)} or less.")
    rt = _runtime(cfg)
    backbone, datamodule, module = _setup(cfg, splits, recipe.augment, regularize=True, batch_size=cfg.batch_size,
                                          rt=rt)
    output = Path(cfg.output or Path("outputs") / f"lr-find-{time.strftime('%Y%m%d-%H%M%S')}")
    output.mkdir(parents=True, exist_ok=True)
    trainer = _trainer(rt, max_epochs=max(1, math.ceil(num_training / max(1, len(splits.train) // cfg.batch_size))),
                       default_root_dir=output)
    finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr,
                                    num_training=num_training, update_attr=False)
    if finder is None:
        raise UserError("The LR range test returned no result (the loss diverged at once?). Try a smaller --max-lr.")
    suggestion = finder.suggestion()
    fig = finder.plot(suggest=suggestion is not None)
    png = output / "lr_find.png"
    fig.savefig(png, dpi=100)
    result = {"suggested_lr": suggestion, "min_lr": min_lr, "max_lr": max_lr, "num_training": num_training,
              "plot": str(png.resolve()), "lrs": [float(x) for x in finder.results["lr"]],
              "losses": [float(x) for x in finder.results["loss"]]}
    experiment_id = tracking.ensure_experiment(cfg.experiment)
    run = tracking.client().create_run(experiment_id, run_name=cfg.run_name or f"lr-find-{output.name}",
                                       tags={"finetune.command": "lr-find"})
    run_id = run.info.run_id
    tracking.log_params(run_id, {"model": backbone.model_name, "weights_source": backbone.weights_source,
                                 "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
                                 "augment": recipe.augment, "min_lr": min_lr, "max_lr": max_lr})
    if suggestion is not None:
        tracking.client().log_metric(run_id, "suggested_lr", float(suggestion))
    tracking.log_artifact(run_id, png)
    tracking.write_json(output / "lr_find.json", result)
    tracking.log_artifact(run_id, output / "lr_find.json")
    tracking.client().set_terminated(run_id, "FINISHED")
    result["mlflow_run_id"] = run_id
    return result
