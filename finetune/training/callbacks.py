"""Lightning callbacks of the training recipe: weight averaging, divergence stop, train/val gap.

And the babysitting check the lecture notes start with: a fresh classifier's first loss should be
about ln(C).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from finetune import runtime
from finetune.errors import UserError

log = logging.getLogger(__name__)


class DivergenceError(UserError):
    """Training stopped because the loss became NaN/inf or exploded."""


class EMACallback(pl.Callback):
    """Polyak averaging: an exponential moving average of the weights (timm `ModelEmaV3`).

    Updated after every optimizer step, validated on every val batch beside the raw weights
    (`val_acc_ema`, `val_loss_ema`), and the best EMA weights are kept in `best_path` so train.py can
    keep whichever of raw and EMA validates better. timm's decay warmup is on: with decay d the
    average would otherwise remember the first ~1/(1-d) steps (a random head) for a short fine-tune.
    """

    def __init__(self, decay: float, best_path: str | Path):
        self.decay = decay
        self.best_path = Path(best_path)
        self.ema: ModelEmaV3 | None = None
        self.best_acc = -1.0
        self.best_epoch = -1
        self._correct = self._loss = self._count = None
        self._pending_state: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ema = ModelEmaV3(pl_module.net, decay=self.decay, use_warmup=True)
        if self._pending_state is not None:  # resumed from a checkpoint
            self.ema.module.load_state_dict(self._pending_state["ema"])
            self.best_acc = self._pending_state["best_acc"]
            self.best_epoch = self._pending_state["best_epoch"]
            self._pending_state = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert self.ema is not None
        self.ema.update(pl_module.net, step=trainer.global_step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        device = pl_module.device
        self._correct = torch.zeros((), device=device)
        self._loss = torch.zeros((), device=device)
        self._count = torch.zeros((), device=device)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch is None or self.ema is None or trainer.sanity_checking:
            return
        x, y = batch
        with trainer.precision_plugin.forward_context():  # the precision the raw weights validate in
            logits = self.ema.module(x).float()
        self._correct += (logits.argmax(dim=1) == y).sum()
        self._loss += F.cross_entropy(logits, y, reduction="sum")
        self._count += y.numel()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.ema is None or trainer.sanity_checking or self._count is None:
            return
        stats = trainer.strategy.reduce(torch.stack([self._correct, self._loss, self._count]), reduce_op="sum")
        count = max(float(stats[2]), 1.0)
        acc, loss = float(stats[0]) / count, float(stats[1]) / count
        pl_module.log("val_acc_ema", acc, prog_bar=True, sync_dist=False)
        pl_module.log("val_loss_ema", loss, sync_dist=False)
        if acc > self.best_acc and not trainer.fast_dev_run:
            self.best_acc, self.best_epoch = acc, trainer.current_epoch
            if trainer.is_global_zero:
                self.best_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"state_dict": self.ema.module.state_dict(), "epoch": self.best_epoch,
                            "val_acc_ema": acc}, self.best_path)

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"ema": self.ema.module.state_dict(), "best_acc": self.best_acc, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = state_dict


class DivergenceCallback(pl.Callback):
    """Stop at the first NaN/inf loss, or a loss `factor` times the first one (at least ln C).

    Raises `DivergenceError` from inside the loop, so no checkpoint of the diverged weights is
    written: the last one on disk is the last good one, and the message names it. Under DDP the
    losses of all ranks are gathered at every step and the decision is taken on all of them, so every
    rank stops at the same step with the same message (a rank stopping alone would leave the others
    waiting in the next all-reduce).
    """

    def __init__(self, num_classes: int, factor: float = 10.0, checkpoint: pl.callbacks.ModelCheckpoint | None = None):
        self.reference = math.log(max(num_classes, 2))
        self.factor = factor
        self.checkpoint = checkpoint
        self.first_loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # only in a single process: Lightning refuses a None loss under DDP
            return
        losses = [float(loss.detach())]
        if trainer.world_size > 1:
            mine = loss.detach().double().reshape(1)
            losses = [float(v) for v in trainer.strategy.all_gather(mine).reshape(-1)]
        if self.first_loss is None and all(math.isfinite(v) for v in losses):
            self.first_loss = sum(losses) / len(losses)
            return
        limit = self.factor * max(self.first_loss or 0.0, self.reference)
        bad = [(rank, v) for rank, v in enumerate(losses) if not (math.isfinite(v) and v <= limit)]
        if not bad:
            return
        rank, value = bad[0]
        why = "is not a number" if math.isnan(value) else (
            "is infinite" if math.isinf(value) else f"exceeds {self.factor:g}x the first loss ({limit:.3g})")
        where = f" on rank {rank}" if len(losses) > 1 else ""
        lrs = ", ".join(f"{g['lr']:.3g}" for g in trainer.optimizers[0].param_groups) if trainer.optimizers else "?"
        raise DivergenceError(
            f"Training diverged at epoch {trainer.current_epoch}, step {trainer.global_step}: the loss {value:.4g}"
            f"{where} {why}. Stopped; {self._last_good()}. Lower the learning rate (--lr, current group LRs: {lrs}), "
            "add --warmup-epochs, or run `finetune lr-find` to pick one.")

    def _last_good(self) -> str:
        ckpt = self.checkpoint
        path = (ckpt.last_model_path or ckpt.best_model_path) if ckpt is not None else ""
        if path and Path(path).is_file():
            return f"the last good checkpoint is {path}"
        return "no checkpoint was saved yet (it diverged in the first epoch)"


class TrainValGapCallback(pl.Callback):
    """Logs `train_val_acc_gap` = train_acc - val_acc each epoch: a growing gap is overfitting."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        if "train_acc" in metrics and "val_acc" in metrics:
            gap = float(metrics["train_acc"]) - float(metrics["val_acc"])
            pl_module.log("train_val_acc_gap", gap, sync_dist=False)


@torch.no_grad()
def initial_loss(net: torch.nn.Module, loader, rt: runtime.Runtime | None = None, max_batches: int = 1) -> float:
    """Plain cross-entropy of the untrained model on the first batches (eval mode, no augmentation), on
    `rt`'s device and precision (the CPU when not given); the model is left where and as it was."""
    rt = rt or runtime.cpu()
    total, count = 0.0, 0
    with runtime.evaluating_on(net, rt.device), rt.autocast():
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            if batch is None:
                continue
            x, y = batch
            logits = net(x.to(rt.device)).float()
            total += float(F.cross_entropy(logits, y.to(rt.device), reduction="sum"))
            count += y.numel()
    return total / max(count, 1)


def check_initial_loss(loss: float, num_classes: int, tolerance: float = 0.5) -> str | None:
    """A warning message when a fresh head's first loss is far from ln(C) (relative `tolerance`), else None.

    A loss well above ln(C) means over-confident random logits (head init too large, or unnormalised
    inputs); well below means the head is not fresh or labels leak. Either way, look before training.
    """
    expected = math.log(num_classes)
    if not math.isfinite(loss) or abs(loss - expected) > tolerance * expected:
        return (f"Initial loss {loss:.3f} is far from ln({num_classes}) = {expected:.3f}, the loss of a fresh "
                "head predicting uniformly. Check the preprocessing (mean/std) and the head initialisation.")
    return None


def recipe_callbacks(cfg, recipe, num_classes: int, checkpoint: pl.callbacks.ModelCheckpoint | None,
                     output: str | Path) -> list[pl.Callback]:
    """The recipe's callbacks for a Trainer: LR monitor, divergence stop, train/val gap, EMA, early stop."""
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor

    callbacks: list[pl.Callback] = [LearningRateMonitor(logging_interval="step"),
                                    DivergenceCallback(num_classes, checkpoint=checkpoint), TrainValGapCallback()]
    if recipe.ema:
        callbacks.append(EMACallback(recipe.ema, Path(output) / "checkpoints" / "best_ema.pt"))
    if cfg.patience:
        # Patience counts validation epochs without a better val_acc (raw weights, what the checkpoint tracks).
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max", patience=cfg.patience))
    return callbacks
