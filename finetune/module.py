"""The LightningModule: step logic only. Model, optimizer groups and schedule come from outside."""

from __future__ import annotations

from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class Classifier(pl.LightningModule):
    """Cross-entropy classifier around any network that maps images to logits.

    Args:
        net: the network (a timm model, or a head on top of frozen features).
        num_classes: number of classes (for top-5 and sanity checks).
        optimizer_factory: called with the module, returns the optimizer (or the Lightning dict with
            a scheduler). Keeps optimizer choice and per-group learning rates out of the step logic.
    """

    def __init__(self, net: nn.Module, num_classes: int, optimizer_factory: Callable[[nn.Module], Any],
                 class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer_factory
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def model_step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, weight=self.class_weights,
                               label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        hard = y if y.ndim == 1 else y.argmax(dim=1)
        k = min(5, self.num_classes)
        topk = logits.topk(k, dim=1).indices
        acc = (topk[:, 0] == hard).float().mean()
        acc5 = (topk == hard[:, None]).any(dim=1).float().mean()
        bs = x.shape[0]
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}_acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}_acc_top5", acc5, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        if batch is None:  # every image of the batch failed to decode
            return None
        return self.model_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return None
        return self.model_step(batch, "val")

    def test_step(self, batch, batch_idx):
        if batch is None:
            return None
        return self.model_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=1)

    def configure_optimizers(self):
        return self.optimizer_factory(self.net)
