"""Training linear heads on cached features, several weight decays side by side in one fit."""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
from typing import Any, Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from finetune import runtime

log = logging.getLogger(__name__)


class _FeatureViews(Dataset):
    """Rows of one or more views [V, N, C]; each access picks one view at random (train) or view 0.

    Batches are fetched whole (`__getitems__`): one fancy-indexing read per batch and view instead
    of one Python call per image, so an epoch over cached features costs next to nothing.
    """

    def __init__(self, views: Sequence[np.ndarray], labels: np.ndarray, rows: np.ndarray, mean: np.ndarray,
                 std: np.ndarray, random_view: bool, generator: torch.Generator | None = None):
        self.views = [(v, k) for v in views for k in range(v.shape[0])]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.rows = np.asarray(rows)
        self.mean = torch.from_numpy(mean)
        self.std = torch.from_numpy(std)
        self.random_view = random_view
        self.generator = generator

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]):
        rows = self.rows[np.asarray(indices)]
        if self.random_view and len(self.views) > 1:
            choice = torch.randint(len(self.views), (len(rows),), generator=self.generator).numpy()
        else:
            choice = np.zeros(len(rows), dtype=np.int64)
        x = torch.empty(len(rows), self.mean.numel())
        for v in np.unique(choice):
            array, k = self.views[int(v)]
            picked = np.flatnonzero(choice == v)
            order = np.argsort(rows[picked])  # memmaps read fastest in file order
            x[picked[order]] = torch.from_numpy(np.asarray(array[k, rows[picked[order]]], dtype=np.float32))
        return (x - self.mean) / self.std, self.labels[rows]


def _batch_as_is(batch):
    return batch


class HeadSearch(pl.LightningModule):
    """One linear head per weight-decay candidate, trained side by side on the same batches."""

    def __init__(self, in_features: int, num_classes: int, weight_decays: Sequence[float],
                 optimizer_factory: Callable[[list[dict[str, Any]], nn.Module], Any],
                 class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.weight_decays = [float(w) for w in weight_decays]
        # The training loss only (--class-weights auto, --label-smoothing); validation ranks the
        # candidates by plain accuracy and cross-entropy.
        self.register_buffer("class_weights", None if class_weights is None else class_weights.float())
        self.label_smoothing = float(label_smoothing)
        self.heads = nn.ModuleList(nn.Linear(in_features, num_classes) for _ in self.weight_decays)
        for h in self.heads:  # zero init: every candidate starts from "no opinion"
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)
        self.optimizer_factory = optimizer_factory
        self.best: list[dict[str, Any]] = [{"acc": -1.0, "loss": float("inf"), "epoch": -1, "state": None}
                                           for _ in self.weight_decays]
        self._val: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = torch.stack([self.train_loss(h(x), y) for h in self.heads])
        acc = (self.heads[0](x).argmax(1) == y).float().mean()
        self.log("train_loss", losses.min(), on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train_acc", acc, on_step=False, on_epoch=True, batch_size=len(y))
        return losses.sum()

    def train_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def on_validation_epoch_start(self) -> None:
        self._val = [[0.0, 0.0, 0.0] for _ in self.heads]  # loss sum, correct, count

    def validation_step(self, batch, batch_idx):
        x, y = batch
        for i, h in enumerate(self.heads):
            logits = h(x)
            self._val[i][0] += float(F.cross_entropy(logits, y, reduction="sum"))
            self._val[i][1] += float((logits.argmax(1) == y).sum())
            self._val[i][2] += len(y)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        results = []
        for i, (loss_sum, correct, n) in enumerate(self._val):
            acc, loss = correct / max(n, 1), loss_sum / max(n, 1)
            results.append((acc, loss))
            self.log(f"val_acc_wd{i}", acc)
            b = self.best[i]
            if (acc, -loss) > (b["acc"], -b["loss"]):
                # Kept on the CPU: the head trains wherever Lightning put it, the result is folded on the CPU.
                self.best[i] = {"acc": acc, "loss": loss, "epoch": self.current_epoch,
                                "state": {k: v.detach().cpu().clone() for k, v in self.heads[i].state_dict().items()}}
        acc, loss = max(results, key=lambda r: (r[0], -r[1]))
        self.log("val_acc", acc, prog_bar=True)
        self.log("val_loss", loss, prog_bar=True)

    def configure_optimizers(self):
        groups = [{"params": list(h.parameters()), "weight_decay": wd, "name": f"head wd={wd:g}"}
                  for h, wd in zip(self.heads, self.weight_decays)]
        return self.optimizer_factory(groups, self)


def head_train_loader(train_ds: _FeatureViews, batch_size: int, num_classes: int, balanced: bool,
                      generator: torch.Generator) -> DataLoader:
    """Shuffled rows; or, balanced, every class drawn equally often (as `loaders.balanced_sampler_factory`)."""
    if not balanced:
        return DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=_batch_as_is)
    labels = train_ds.labels[torch.from_numpy(train_ds.rows)]
    counts = torch.bincount(labels, minlength=num_classes).float()
    sampler = WeightedRandomSampler((1.0 / counts.clamp(min=1))[labels].double(), num_samples=len(labels),
                                    replacement=True, generator=generator)
    return DataLoader(train_ds, batch_size=batch_size, sampler=sampler, collate_fn=_batch_as_is)


@dataclass
class HeadResult:
    weight: torch.Tensor  # [classes, features], for raw (unstandardised) features
    bias: torch.Tensor
    weight_decay: float
    val_acc: float
    val_loss: float
    best_epoch: int
    candidates: list[dict[str, float]] = field(default_factory=list)


@dataclass
class HeadData:
    """Standardised cached features, as a linear head trains on them."""

    train: DataLoader
    val: DataLoader
    mean: np.ndarray
    std: np.ndarray
    in_features: int


def head_data(train_views: Sequence[np.ndarray], train_labels: np.ndarray, train_valid: np.ndarray,
              val_features: np.ndarray, val_labels: np.ndarray, val_valid: np.ndarray, num_classes: int,
              batch_size: int, seed: int = 0, balanced: bool = False) -> HeadData:
    """The loaders a head trains on: features standardised with the clean training view's statistics."""
    clean = np.asarray(train_views[0][0], dtype=np.float64)[train_valid]
    mean = clean.mean(axis=0).astype(np.float32)
    std = clean.std(axis=0).astype(np.float32)
    # Nearly constant channels would get a huge weight once the standardisation is folded in, and any
    # drift of those channels would then swamp the logits: floor the scale at a tenth of the median
    # channel's (docs/decisions.md).
    std = np.maximum(std, 0.1 * float(np.median(std)) + 1e-6).astype(np.float32)
    train_rows = np.flatnonzero(train_valid)
    val_rows = np.flatnonzero(val_valid)
    generator = torch.Generator().manual_seed(seed)
    train_ds = _FeatureViews(train_views, train_labels, train_rows, mean, std, random_view=True, generator=generator)
    train_loader = head_train_loader(train_ds, min(batch_size, len(train_rows)), num_classes, balanced, generator)
    val_loader = DataLoader(_FeatureViews([val_features], val_labels, val_rows, mean, std, random_view=False),
                            batch_size=max(batch_size, 512), collate_fn=_batch_as_is)
    return HeadData(train_loader, val_loader, mean, std, clean.shape[1])


def fit_linear_head(train_views: Sequence[np.ndarray], train_labels: np.ndarray, train_valid: np.ndarray,
                    val_features: np.ndarray, val_labels: np.ndarray, val_valid: np.ndarray, num_classes: int,
                    weight_decays: Sequence[float], epochs: int, batch_size: int,
                    optimizer_factory: Callable[[list[dict[str, Any]], nn.Module], Any], seed: int = 0,
                    logger: Any = False, rt: runtime.Runtime | None = None, class_weights: torch.Tensor | None = None,
                    balanced: bool = False, label_smoothing: float = 0.0) -> HeadResult:
    """Train a linear head on cached features; choose the weight decay on the validation split.

    Args:
        train_views: arrays [V, N, C] of training features (clean view and augmented views); each
            epoch every image contributes one view picked at random.
        val_features: array [1, M, C] (clean view).
        optimizer_factory: (param groups, module) -> optimizer; each group carries its own
            weight_decay and gets its LR from the factory.
        rt: where the heads train (this process's own device); the CPU when not given. The returned
            weights are CPU tensors either way.
        class_weights: per-class weights of the training loss ([num_classes]; --class-weights auto).
        balanced: draw every class equally often (with replacement) instead of shuffling (--sampler balanced).
        label_smoothing: of the training loss (--label-smoothing).
    """
    rt = rt or runtime.cpu()
    data = head_data(train_views, train_labels, train_valid, val_features, val_labels, val_valid, num_classes,
                     batch_size, seed, balanced)
    train_loader, val_loader, mean, std = data.train, data.val, data.mean, data.std
    module = HeadSearch(data.in_features, num_classes, weight_decays, optimizer_factory, class_weights, label_smoothing)
    trainer = pl.Trainer(max_epochs=epochs, accelerator=rt.accelerator, devices=rt.lightning_devices, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=1, deterministic=False)
    trainer.fit(module, train_loader, val_loader)
    best_i = max(range(len(module.best)), key=lambda i: (module.best[i]["acc"], -module.best[i]["loss"]))
    best = module.best[best_i]
    w = best["state"]["weight"].detach().float()
    b = best["state"]["bias"].detach().float()
    # Fold the standardisation in: W (x - m) / s + b == (W / s) x + (b - W m / s).
    s_t, m_t = torch.from_numpy(std), torch.from_numpy(mean)
    weight = w / s_t
    bias = b - (w * (m_t / s_t)).sum(dim=1)
    candidates = [{"weight_decay": wd, "val_acc": round(r["acc"], 4), "val_loss": round(r["loss"], 4),
                   "best_epoch": r["epoch"]} for wd, r in zip(module.weight_decays, module.best)]
    log.info("Linear head: weight decay %g chosen on val (acc %.4f); candidates %s",
             module.weight_decays[best_i], best["acc"], candidates)
    return HeadResult(weight, bias, module.weight_decays[best_i], best["acc"], best["loss"], best["epoch"],
                      candidates)
