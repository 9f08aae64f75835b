"""Datasets, samplers and the Lightning DataModule that feed training from a scanned folder."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler, default_collate

from finetune.data.folders import FolderSplits, Sample
from finetune.data.images import ImageError, display_path, load_rgb

log = logging.getLogger(__name__)


class ImageListDataset(Dataset):
    """(path, label) samples decoded with `load_rgb` and passed through a transform.

    A file that fails to decode at run time (changed since the scan) yields None; `skip_none_collate`
    drops it from the batch, so the epoch goes on.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable | None, max_pixels: int | None = None,
                 draft_size: tuple[int, int] | None = None, num_labels: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.num_labels = num_labels  # multi-label data: the target is a 0/1 vector of this many classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            img = load_rgb(sample.path, self.max_pixels, self.draft_size)
        except (ImageError, OSError) as e:
            log.warning("Skipping %s: %s", display_path(sample.path), e)
            return None
        x = self.transform(img) if self.transform is not None else img
        if self.num_labels is None:
            return x, sample.label
        return x, multi_hot(sample.labels, self.num_labels)


def multi_hot(labels: Sequence[int], num_labels: int) -> torch.Tensor:
    target = torch.zeros(num_labels)
    target[list(labels)] = 1.0
    return target


def skip_none_collate(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return default_collate(batch)


class FolderDataModule(pl.LightningDataModule):
    def __init__(self, splits: FolderSplits, train_transform: Callable, eval_transform: Callable,
                 batch_size: int = 32, num_workers: int = 0, max_pixels: int | None = None,
                 draft_size: tuple[int, int] | None = None, sampler_factory: Callable | None = None,
                 pin_memory: bool = False):
        super().__init__()
        self.splits = splits
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.num_workers = num_workers  # from finetune.runtime, like pin_memory
        self.pin_memory = pin_memory
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.sampler_factory = sampler_factory

    def _loader(self, samples: Sequence[Sample], transform: Callable, train: bool) -> DataLoader:
        ds = ImageListDataset(samples, transform, self.max_pixels, self.draft_size,
                              len(self.splits.classes) if self.splits.multi_label else None)
        sampler = self.sampler_factory(ds.samples) if (train and self.sampler_factory) else None
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=skip_none_collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=train and len(ds) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits.train, self.train_transform, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.val, self.eval_transform, train=False)


def balanced_sampler_factory(num_classes: int):
    """A `FolderDataModule(sampler_factory=...)`: each class drawn equally often (with replacement)."""

    def factory(samples) -> WeightedRandomSampler:
        labels = [s.label for s in samples]
        counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float()
        weights = (1.0 / counts.clamp(min=1))[labels]
        return WeightedRandomSampler(weights.double(), num_samples=len(labels), replacement=True)

    return factory


class EpochShuffle(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by (seed, epoch) instead of the global RNG, so the order of an
    epoch does not depend on when Lightning creates the loader's iterator (which differs on resume).
    Lightning calls `set_epoch` before each epoch, as for DistributedSampler."""

    def __init__(self, samples, seed: int):
        self.n = len(samples)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())
