"""Training linear heads on cached features, several weight decays side by side in one fit, the weight decay
and the number of epochs chosen by cross-validation on the training rows."""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
import warnings
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
    """One linear head per weight-decay candidate, trained side by side on the same batches.

    Each validation epoch appends every candidate's (correct, loss sum, count) on the held-out rows to
    `history`: cross-validation sums them over the folds to choose a weight decay and an epoch.
    """

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
        self.history: list[list[tuple[float, float, float]]] = [[] for _ in self.weight_decays]
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
        self._val = [[0.0, 0.0, 0.0] for _ in self.heads]  # correct, loss sum, count

    def validation_step(self, batch, batch_idx):
        x, y = batch
        for i, h in enumerate(self.heads):
            logits = h(x)
            self._val[i][0] += float((logits.argmax(1) == y).sum())
            self._val[i][1] += float(F.cross_entropy(logits, y, reduction="sum"))
            self._val[i][2] += len(y)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        for i, (correct, loss_sum, n) in enumerate(self._val):
            self.history[i].append((correct, loss_sum, n))

    def state_of(self, i: int) -> dict[str, torch.Tensor]:
        """Head `i`'s weights on the CPU (the heads train wherever Lightning put them)."""
        return {k: v.detach().cpu().clone() for k, v in self.heads[i].state_dict().items()}

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
    select_acc: float  # cross-validated accuracy of the chosen (weight decay, epochs) on the training rows
    select_loss: float
    epochs: int  # the chosen number of epochs (the refit on every training row runs this many)
    folds: int
    candidates: list[dict[str, float]] = field(default_factory=list)
    # Per fold: (held-out rows, weight, bias) of the head refitted on the other folds with the chosen weight
    # decay and epochs: the out-of-fold models later choices (test-time crops) are scored with.
    fold_heads: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class HeadData:
    """Standardised cached features, as a linear head trains on them."""

    train: DataLoader
    val: DataLoader | None
    mean: np.ndarray
    std: np.ndarray
    in_features: int


def standardisation(clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of the clean training view's channels [N, C]."""
    clean = np.asarray(clean, dtype=np.float64)
    mean = clean.mean(axis=0).astype(np.float32)
    std = clean.std(axis=0).astype(np.float32)
    # Nearly constant channels would get a huge weight once the standardisation is folded in, and any
    # drift of those channels would then swamp the logits: floor the scale at a tenth of the median
    # channel's (docs/decisions.md).
    return mean, np.maximum(std, 0.1 * float(np.median(std)) + 1e-6).astype(np.float32)


def head_data(train_views: Sequence[np.ndarray], labels: np.ndarray, train_rows: np.ndarray,
              val_rows: np.ndarray | None, num_classes: int, batch_size: int, seed: int = 0,
              balanced: bool = False) -> HeadData:
    """The loaders a head trains on: `train_rows` of every view, and (when given) `val_rows` of the clean
    view held out; features standardised with the clean view's statistics over the training rows."""
    mean, std = standardisation(np.asarray(train_views[0][0])[train_rows])
    generator = torch.Generator().manual_seed(seed)
    train_ds = _FeatureViews(train_views, labels, train_rows, mean, std, random_view=True, generator=generator)
    train_loader = head_train_loader(train_ds, min(batch_size, len(train_rows)), num_classes, balanced, generator)
    val_loader = None
    if val_rows is not None:
        val_loader = DataLoader(_FeatureViews([train_views[0]], labels, val_rows, mean, std, random_view=False),
                                batch_size=max(batch_size, 512), collate_fn=_batch_as_is)
    return HeadData(train_loader, val_loader, mean, std, mean.shape[0])


@dataclass
class HeadFit:
    """How each head of a search trains: what `fit_linear_head` passes to every fold and to the refit."""

    num_classes: int
    batch_size: int
    optimizer_factory: Callable[[list[dict[str, Any]], nn.Module], Any]
    seed: int = 0
    rt: runtime.Runtime | None = None
    class_weights: torch.Tensor | None = None
    balanced: bool = False
    label_smoothing: float = 0.0

    def run(self, views: Sequence[np.ndarray], labels: np.ndarray, train_rows: np.ndarray,
            val_rows: np.ndarray | None, weight_decays: Sequence[float], epochs: int,
            logger: Any = False) -> tuple[HeadSearch, HeadData]:
        rt = self.rt or runtime.cpu()
        data = head_data(views, labels, train_rows, val_rows, self.num_classes, self.batch_size, self.seed,
                         self.balanced)
        module = HeadSearch(data.in_features, self.num_classes, weight_decays, self.optimizer_factory,
                            self.class_weights, self.label_smoothing)
        trainer = pl.Trainer(max_epochs=epochs, accelerator=rt.accelerator, devices=rt.lightning_devices,
                             logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
                             deterministic=False)
        trainer.fit(module, data.train, data.val)
        return module, data

    def folded(self, module: HeadSearch, data: HeadData, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Head `i` with the standardisation folded in: W (x - m) / s + b == (W / s) x + (b - W m / s)."""
        state = module.state_of(i)
        w, b = state["weight"].float(), state["bias"].float()
        s_t, m_t = torch.from_numpy(data.std), torch.from_numpy(data.mean)
        return w / s_t, b - (w * (m_t / s_t)).sum(dim=1)


def cv_folds(labels: np.ndarray, rows: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified (train rows, held-out rows) pairs over `rows`: `folds` of them, fewer when the smallest
    class has fewer images (at least 2: a class of one image is then always on the training side)."""
    from sklearn.model_selection import StratifiedKFold

    y = labels[rows]
    counts = np.bincount(y)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    if len(rows) < 2 * k:
        raise ValueError(f"{len(rows)} images are too few for {k}-fold cross-validation")
    with warnings.catch_warnings():  # "least populated class has only 1 member": that class trains in every fold
        warnings.simplefilter("ignore", UserWarning)
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(rows, y)
        return [(rows[a], rows[b]) for a, b in splits]


def _cv_choice(modules: list[HeadSearch], weight_decays: Sequence[float]) -> tuple[int, int, list[dict[str, Any]]]:
    """(weight decay index, epoch index, per-candidate summary) with the best accuracy summed over the folds
    (ties: lower loss, then fewer epochs)."""
    best: tuple[float, float, int] | None = None
    chosen, candidates = (0, 0), []
    for i, wd in enumerate(weight_decays):
        curves = np.array([m.history[i] for m in modules], dtype=np.float64)  # [folds, epochs, 3]
        correct, loss, n = curves.sum(axis=0).T
        acc, mean_loss = correct / np.maximum(n, 1), loss / np.maximum(n, 1)
        e = max(range(len(acc)), key=lambda j: (acc[j], -mean_loss[j], -j))
        candidates.append({"weight_decay": wd, "cv_acc": round(float(acc[e]), 4), "cv_loss": round(float(mean_loss[e]), 4),
                           "epochs": e + 1})
        key = (float(acc[e]), -float(mean_loss[e]), -e)
        if best is None or key > best:
            best, chosen = key, (i, e)
    return chosen[0], chosen[1], candidates


def fit_linear_head(train_views: Sequence[np.ndarray], train_labels: np.ndarray, train_valid: np.ndarray,
                    num_classes: int, weight_decays: Sequence[float], epochs: int, batch_size: int,
                    optimizer_factory: Callable[[list[dict[str, Any]], nn.Module], Any], folds: int = 5,
                    seed: int = 0, logger: Any = False, rt: runtime.Runtime | None = None,
                    class_weights: torch.Tensor | None = None, balanced: bool = False,
                    label_smoothing: float = 0.0, fold_heads: bool = False) -> HeadResult:
    """Train a linear head on cached features, its weight decay and epochs chosen by cross-validation on the
    training rows alone; then refit on every training row. No other split is read.

    Args:
        train_views: arrays [V, N, C] of training features (clean view and augmented views); each
            epoch every image contributes one view picked at random. Held-out rows are scored on the clean view.
        folds: stratified folds of the cross-validation (fewer when a class has fewer images).
        optimizer_factory: (param groups, module) -> optimizer; each group carries its own
            weight_decay and gets its LR from the factory.
        rt: where the heads train (this process's own device); the CPU when not given. The returned
            weights are CPU tensors either way.
        class_weights: per-class weights of the training loss ([num_classes]; --class-weights auto).
        balanced: draw every class equally often (with replacement) instead of shuffling (--sampler balanced).
        label_smoothing: of the training loss (--label-smoothing).
        fold_heads: also refit each fold's head with the chosen weight decay and epochs (out-of-fold models).
    """
    fit = HeadFit(num_classes, batch_size, optimizer_factory, seed, rt, class_weights, balanced, label_smoothing)
    rows = np.flatnonzero(train_valid)
    splits = cv_folds(np.asarray(train_labels), rows, folds, seed)
    modules = [fit.run(train_views, train_labels, a, b, weight_decays, epochs)[0] for a, b in splits]
    wd_i, epoch_i, candidates = _cv_choice(modules, weight_decays)
    chosen = candidates[wd_i]
    wd = float(weight_decays[wd_i])
    module, data = fit.run(train_views, train_labels, rows, None, [wd], epoch_i + 1, logger)
    weight, bias = fit.folded(module, data)
    oof = []
    if fold_heads:
        for a, b in splits:
            m, d = fit.run(train_views, train_labels, a, None, [wd], epoch_i + 1)
            oof.append((b, *fit.folded(m, d)))
    log.info("Linear head: weight decay %g, %d epoch(s), chosen by %d-fold cross-validation on train (acc %.4f); "
             "candidates %s", wd, epoch_i + 1, len(splits), chosen["cv_acc"], candidates)
    return HeadResult(weight, bias, wd, chosen["cv_acc"], chosen["cv_loss"], epoch_i + 1, len(splits), candidates, oof)
