"""Lightning callbacks of the training recipe: weight averaging, divergence stop, train/val gap.

And the babysitting check the lecture notes start with: a fresh classifier's first loss should be
about ln(C).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import WeightAveraging

from finetune import runtime, timing
from finetune.training.recipe import Recipe
from finetune.errors import UserError

log = logging.getLogger(__name__)


class DivergenceError(UserError):
    """Training stopped because the loss became NaN/inf or exploded."""


def ema_warmup_decay(num_averaged: int, decay: float, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                     min_decay: float = 0.0) -> float:
    """The decay of the `num_averaged`-th EMA update: timm `ModelEmaV3`'s warm-up with its defaults,
    clamp(1 - (1 + t / gamma) ** -power, min_decay, decay) for t = num_averaged (0 for the first update,
    which copies the weights). With a fixed decay d the average would remember the first ~1/(1-d) steps
    (a random head) through a short fine-tune; the warm-up averages the early steps lightly instead."""
    if num_averaged <= 0:
        return 0.0
    return max(min(1.0 - (1.0 + num_averaged / warmup_gamma) ** -warmup_power, decay), min_decay)


def ema_warmup_avg_fn(decay: float, **warmup: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """A `multi_avg_fn` for torch's `AveragedModel` (so for Lightning's `WeightAveraging`): an EMA whose decay
    warms up as `ema_warmup_decay` says. Floating-point tensors move towards the model's; integer buffers
    (BatchNorm's `num_batches_tracked`) are copied, as timm does."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        # AveragedModel groups the tensors by device and dtype: a group is all floating point or none.
        if averaged[0].is_floating_point():
            weight = 1.0 - ema_warmup_decay(int(num_averaged), decay, **warmup)
            torch._foreach_lerp_(averaged, current, weight)
        else:
            torch._foreach_copy_(averaged, current)

    return update


class EMA(WeightAveraging):
    """Polyak averaging: an exponential moving average of the weights, with timm's decay warm-up.

    Lightning's `WeightAveraging` does the rest: the average is updated after every optimizer step, swapped
    in for validation (so with --ema `select_acc` is the EMA weights' accuracy, what the best checkpoint and
    early stopping follow), saved as the checkpoints' `state_dict` (the raw weights beside it in
    `current_model_state`, both restored on --resume) and copied into the model when training ends: the
    EMA weights are the model. Under DDP every rank averages the same (synchronised) weights.
    """

    def __init__(self, decay: float):
        super().__init__(use_buffers=True, multi_avg_fn=ema_warmup_avg_fn(decay))
        self.decay = decay
        self._swapped = False

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        super()._swap_models(pl_module)
        self._swapped = not self._swapped

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written during validation (a second Ctrl+C there) would otherwise store the swapped-in
        # average as the raw weights and the raw ones as the average.
        if not self._swapped:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        self._swap_models(pl_module)
        try:
            checkpoint["state_dict"] = pl_module.state_dict()
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            # The swap back changes these tensors in place; the checkpoint is written afterwards.
            for key in ("state_dict", "current_model_state", "averaging_state"):
                checkpoint[key] = {k: v.detach().clone() for k, v in checkpoint[key].items()}
        finally:
            self._swap_models(pl_module)


class ValidationTime(pl.Callback):
    """Lightning's validation passes, timed as the phase "validation" (finetune.timing)."""

    def __init__(self) -> None:
        self.span = timing.Span("validation")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.span.start()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.span.stop()


class EpochScores(pl.Callback):
    """The selection metrics of every epoch validated in this process (epoch -> select_*), as Lightning
    reduced them (over the ranks too): the best checkpoint's scores are read here, not validated again."""

    KEYS = ("select_acc", "select_loss", "select_acc_top5")  # one label per image (`module.selection_keys`)

    def __init__(self, keys: tuple[str, ...] = KEYS) -> None:
        self.keys = keys
        self.scores: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if not trainer.sanity_checking and all(k in metrics for k in self.keys):
            self.scores[trainer.current_epoch] = {k: float(metrics[k]) for k in self.keys}

    # In every checkpoint: a resumed run reads the scores of the epochs validated before the resume as they were,
    # instead of validating the best epoch again on another loader and trainer.
    def state_dict(self) -> dict[str, Any]:
        return {"scores": {str(epoch): dict(s) for epoch, s in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores.update({int(epoch): dict(s) for epoch, s in state.get("scores", {}).items()})


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
    """Logs `train_select_acc_gap` = train_acc - select_acc each epoch: a growing gap is overfitting."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        if "train_acc" in metrics and "select_acc" in metrics:
            gap = float(metrics["train_acc"]) - float(metrics["select_acc"])
            pl_module.log("train_select_acc_gap", gap, sync_dist=False)


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


def recipe_callbacks(recipe: Recipe, num_classes: int, checkpoint: pl.callbacks.ModelCheckpoint | None,
                     monitor: str = "select_acc") -> list[pl.Callback]:
    """The recipe's callbacks for a Trainer: LR monitor, divergence stop, train/val gap, EMA, early stop."""
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor

    callbacks: list[pl.Callback] = [LearningRateMonitor(logging_interval="step"),
                                    DivergenceCallback(num_classes, checkpoint=checkpoint), TrainValGapCallback()]
    if recipe.ema:
        callbacks.append(EMA(recipe.ema))
    if recipe.patience:
        # Patience counts validation epochs without a better select_acc (select_map with several labels per image;
        # the EMA weights' with --ema, as the best checkpoint).
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=recipe.patience))
    return callbacks
