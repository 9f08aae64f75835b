"""The LightningModule: step logic only. Model, optimizer groups and schedule come from outside."""

from __future__ import annotations

import math
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from finetune.data.multilabel import macro_map


SELECT = "select"  # the name of the validation loop's metrics: select_acc, select_loss, select_acc_top5


def selection_metric(multi_label: bool) -> str:
    """What chooses the epoch and the weights: selection accuracy; with several labels per image, the selection
    split's macro mAP (average precision needs no threshold: the thresholds are chosen after)."""
    return "select_map" if multi_label else "select_acc"


def selection_keys(multi_label: bool) -> tuple[str, ...]:
    return ("select_map", "select_loss") if multi_label else ("select_acc", "select_loss", "select_acc_top5")


class Classifier(pl.LightningModule):
    """Cross-entropy classifier around any network that maps images to logits.

    Args:
        net: the network (a timm model, or a head on top of frozen features).
        num_classes: number of classes (for top-5 and sanity checks).
        optimizer_factory: called with the module, returns the optimizer (or the Lightning dict with
            a scheduler). Keeps optimizer choice and per-group learning rates out of the step logic.
        class_weights: per-class loss weights (class imbalance).
        label_smoothing: for hard targets; mixup's soft targets carry their own smoothing.
        mixup: timm `Mixup` applied to each training batch; the loss then takes its soft targets,
            accuracy still the hard labels.
        multi_label: targets are 0/1 vectors (several labels per image): one sigmoid per class and binary cross-
            entropy (`class_weights` then weigh each class's positives, BCE's pos_weight; smoothing pulls the
            targets towards 0.5); the selection metric is the macro mAP of the epoch (`selection_metric`).
    """

    def __init__(self, net: nn.Module, num_classes: int, optimizer_factory: Callable[[nn.Module], Any],
                 class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 mixup: Callable | None = None, multi_label: bool = False):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer_factory
        self.label_smoothing = label_smoothing
        self.mixup = mixup
        self.multi_label = multi_label
        self._selection: list[tuple[torch.Tensor, torch.Tensor]] = []  # multi-label: the epoch's (logits, targets)
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def model_step(self, batch, stage: str, target: torch.Tensor | None = None):
        """Loss and metrics; `target` (soft, from mixup) replaces the hard labels in the loss only."""
        if self.multi_label:
            return self.multi_label_step(batch, stage, target)
        x, hard = batch
        target = hard if target is None else target
        logits = self(x)
        # cross_entropy takes class indices or probabilities; soft targets already hold their smoothing.
        smoothing = self.label_smoothing if stage == "train" and target.ndim == 1 else 0.0
        loss = F.cross_entropy(logits, target, weight=self.class_weights, label_smoothing=smoothing)
        bs = x.shape[0]
        # Batch accuracies (micro: the fraction of correct images), averaged over the epoch weighted by batch
        # size and over the ranks by Lightning (sync_dist), like the loss. Functional, not metric objects: a
        # metric object syncs over any process group it finds, also in rank 0's single-process validation
        # of the kept weights after a DDP fit, where the other ranks are gone.
        acc, acc5 = (multiclass_accuracy(logits.detach(), hard, self.num_classes, top_k=k, average="micro",
                                         validate_args=False) for k in (1, min(5, self.num_classes)))
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}_acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}_acc_top5", acc5, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    def multi_label_step(self, batch, stage: str, target: torch.Tensor | None = None):
        x, hard = batch
        logits = self(x)
        if target is None:  # mixed targets already hold their smoothing (timm's multi-label mixup)
            smoothing = self.label_smoothing if stage == "train" else 0.0
            target = hard.float() * (1.0 - smoothing) + 0.5 * smoothing
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.class_weights)
        if stage == SELECT:
            self._selection.append((logits.detach().float().cpu(), hard.detach().long().cpu()))
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=x.shape[0],
                 sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._selection = []

    def on_validation_epoch_end(self) -> None:
        """Multi-label: the epoch's macro mAP over the classes with a positive image (averaged over the ranks under
        DDP, each rank's own share of the selection split)."""
        if not self.multi_label or not self._selection:
            return
        probs = torch.cat([z for z, _ in self._selection]).sigmoid().numpy()
        value = macro_map(probs, torch.cat([t for _, t in self._selection]).numpy())
        value = 0.0 if math.isnan(value) else value  # no class with a positive image: nothing ranked
        self.log("select_map", torch.tensor(value, device=self.device), prog_bar=True, on_step=False, on_epoch=True,
                 sync_dist=True)
        self._selection = []

    def training_step(self, batch, batch_idx):
        if batch is None:  # every image of the batch failed to decode
            return self.no_loss()
        if self.mixup is None:
            return self.model_step(batch, "train")
        x, y = batch
        if x.shape[0] % 2:  # timm's Mixup pairs images, so it needs an even count (a failed decode makes it odd)
            x, y = x[:-1], y[:-1]
        if x.shape[0] == 0:
            return self.no_loss()
        mixed, soft = self.mixup(x.clone(), y)
        return self.model_step((mixed, y), "train", target=soft)

    def no_loss(self) -> torch.Tensor:
        """A zero loss for a batch with nothing to learn from, with a (zero) gradient to every trainable
        parameter: Lightning refuses a None loss under DDP, and DDP's gradient all-reduce must see every
        parameter on every rank to stay in step with the ranks whose batch was fine."""
        zero = torch.zeros((), device=self.device)
        return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), zero)

    def validation_step(self, batch, batch_idx):
        # Lightning's validation loop runs on the selection split carved from train (run_plan): what
        # chooses the epoch, EMA or raw, warm-up or fine-tuned. Its metrics are named select_*.
        if batch is None:
            return None
        return self.model_step(batch, SELECT)

    def configure_optimizers(self):
        return self.optimizer_factory(self)
