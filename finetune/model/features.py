"""Pooled features of a frozen pretrained backbone, extracted once and cached on disk.

One pass of the backbone (eval mode) over a list of images stores, per image, the globally pooled
output of every stage timm reports in `feature_info` (via `forward_intermediates`) plus the final
pre-logits features (what the classifier sees). The same pass records the pretrained source
classifier's logits and the input statistics of every BatchNorm layer: the inputs of the domain
similarity measure. Everything that only needs a frozen backbone -- the similarity probe, the
linear heads of the small-data plans, the head warm-up of the large-data plans -- reads this cache
instead of running the backbone again.

The cache key covers the architecture, a hash of the weights actually loaded, the preprocessing,
and every file's path, size and modification time: change any of them and the entry is rebuilt;
change none and a second run does no extraction. Arrays are written batch by batch into
memory-mapped `.npy` files, so memory stays bounded for large datasets, and an entry only becomes
visible (atomic rename) once it is complete.

Augmented views ("augmentation cache"): for frozen-backbone plans, `views=K` extracts K augmented
views of every image once (deterministic per image and view); training then samples one view per
image each epoch, so augmentation costs no backbone forward per epoch either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from finetune import runtime, timing
from finetune.data.crops import CropViews
from finetune.data.transforms import eval_transform, resize_size, train_transform
from finetune.model.backbone import Backbone
from finetune.data.folders import Sample
from finetune.model.stages import FINAL
from finetune.data.images import ImageError, display_path, load_rgb_drafts

log = logging.getLogger(__name__)

CACHE_ENV = "FINETUNE_CACHE_DIR"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StageInfo:
    """A place features can be taken from: a `feature_info` stage, or the final pre-logits."""

    key: str  # "stage<i>" or "final"
    index: int | None  # index into feature_info / forward_intermediates; None for final
    module: str  # timm module name, for people
    channels: int
    reduction: int


def feature_stages(model: nn.Module) -> list[StageInfo]:
    """The stages of a timm model, shallow to deep, ending with the final pre-logits features."""
    infos = getattr(model, "feature_info", None) or []
    stages = [StageInfo(f"stage{i}", i, str(f.get("module", i)), int(f["num_chs"]), int(f.get("reduction", 0)))
              for i, f in enumerate(infos)]
    width = int(getattr(model, "head_hidden_size", 0) or getattr(model, "num_features", 0))
    stages.append(StageInfo(FINAL, None, "pre_logits", width, stages[-1].reduction if stages else 0))
    return stages


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.cwd() / ".cache" / "finetune" / "features")


@dataclass
class FeatureSet:
    """Cached features of a list of images. Arrays are memory-mapped, shape [views, images, channels]."""

    stages: list[StageInfo]
    arrays: dict[str, np.ndarray]
    labels: np.ndarray
    valid: np.ndarray  # False where the image could not be decoded at extraction time
    paths: list[str]
    directory: Path
    extracted: bool  # True when this call ran the backbone, False when it was read from the cache
    seconds: float  # wall time of the extraction (0 when read from the cache)
    logits: np.ndarray | None = None  # source classifier logits [images, source classes], clean view
    bn_stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    images_per_s: float | None = None  # how fast the extraction ran (images x views), also when read from the cache

    @property
    def views(self) -> int:
        return int(self.arrays[FINAL].shape[0])

    def stage(self, key: str) -> StageInfo:
        for s in self.stages:
            if s.key == key:
                return s
        raise KeyError(f"no stage {key!r}; stages: {[s.key for s in self.stages]}")

    def subset(self, rows: Sequence[int]) -> "FeatureSet":
        """The features of the images at `rows`, in that order (in memory; without the BatchNorm statistics,
        which describe the whole set)."""
        idx = np.asarray(rows, dtype=int)
        return replace(self, arrays={k: np.asarray(v[:, idx]) for k, v in self.arrays.items()},
                       labels=self.labels[idx], valid=self.valid[idx], paths=[self.paths[i] for i in idx],
                       logits=None if self.logits is None else self.logits[idx], bn_stats={})

    def matrix(self, key: str, view: int = 0, only_valid: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(features [n, C] as float32, labels [n]) of one view of one stage."""
        x = np.asarray(self.arrays[key][view], dtype=np.float32)
        if only_valid:
            return x[self.valid], self.labels[self.valid]
        return x, self.labels


# --- cache key -----------------------------------------------------------------------------------

def weights_fingerprint(backbone: Backbone) -> str:
    """Hash of the weights that shape the features (everything but the new classifier)."""
    model = backbone.model
    head = model.get_classifier()
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    h = hashlib.blake2b(digest_size=16)
    tensors = {**{n: p for n, p in model.named_parameters() if id(p) not in head_ids},
               **dict(model.named_buffers())}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for name, t in sorted((backbone.source_head or {}).items()):
        h.update(f"source_head.{name}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_fingerprint(samples: Sequence[Sample]) -> str:
    """Hash of every file's real path, label, size and modification time, in order.

    Real paths: `../data/x.jpg`, `/abs/data/x.jpg` and a symlink to it are the same image.
    """
    h = hashlib.blake2b(digest_size=16)
    for s in samples:
        try:
            st = os.stat(s.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{os.fsencode(os.path.realpath(s.path)).hex()}|{s.label}|{stamp}\n".encode())
    return h.hexdigest()


def cache_key(backbone: Backbone, samples: Sequence[Sample], transform: Callable, views: int, seed: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "timm": timm.__version__,
        "model": backbone.model_name,
        "create_kwargs": backbone.create_kwargs,
        "weights": weights_fingerprint(backbone),
        "transform": repr(transform),
        "views": views,
        "seed": seed if views > 0 else None,
        "files": files_fingerprint(samples),
        "n": len(samples),
    }


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


# --- extraction ----------------------------------------------------------------------------------

class _ViewDataset(Dataset):
    """(one image tensor per transform, index, ok) per (view, sample); augmented views are seeded per image and view.
    Several transforms (several backbones extracted in one pass) share the decode of each file."""

    def __init__(self, samples: Sequence[Sample], transforms: Sequence[Callable], views: int, seed: int,
                 max_pixels: int | None, draft_sizes: Sequence[tuple[int, int] | None], augmented: bool,
                 input_sizes: Sequence[Sequence[int]]):
        self.samples = list(samples)
        self.transforms = list(transforms)
        self.views = views
        self.seed = seed
        self.max_pixels = max_pixels
        self.draft_sizes = list(draft_sizes)
        self.augmented = augmented
        self.input_sizes = [tuple(s) for s in input_sizes]

    def __len__(self) -> int:
        return len(self.samples) * self.views

    def __getitem__(self, index: int):
        view, i = divmod(index, len(self.samples))
        sample = self.samples[i]
        try:
            images = load_rgb_drafts(sample.path, self.max_pixels, self.draft_sizes)
        except (ImageError, OSError) as e:
            log.warning("Skipping %s in feature extraction: %s", display_path(sample.path), e)
            return tuple(torch.zeros(size) for size in self.input_sizes), index, False
        out = []
        for transform, img in zip(self.transforms, images):
            if self.augmented:  # the same augmented view every time this (image, view) is extracted
                item_seed = (self.seed * 1_000_003 + view * 100_003 + i) % (2**31)
                random.seed(item_seed)
                torch.manual_seed(item_seed)
            x = transform(img)
            out.append(x[view] if isinstance(transform, CropViews) else x)  # a crop mode: this item is crop `view`
        return tuple(out), index, True


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum and sum of squares of a [N, C, ...] tensor over all but the channels, in float64.

    `torch.var_mean` over (N, H, W) runs a Welford loop that CPUs do not vectorise: on mobilenetv2
    it cost about as much as the forward itself. A sum and a 2-norm over the contiguous last
    dimension are vectorised reductions, over 10x cheaper (docs/decisions.md, "Feature extraction
    speed"). Only those rows (one image row, W values) accumulate in float32, the rest in float64:
    summing whole H x W planes in float32 lost up to 0.3% of a variance where a channel's mean is
    large against its spread (E[x^2] - E[x]^2 cancels).
    """
    x = x.detach().float()
    if x.ndim == 2:  # [N, C]: one value per sample and channel
        return x.double().sum(dim=0), x.double().square().sum(dim=0)
    rest = [0, *range(2, x.ndim - 1)]
    sums = x.sum(dim=-1).double().sum(dim=rest)
    squares = torch.linalg.vector_norm(x, dim=-1).double().square().sum(dim=rest)
    return sums, squares


class _BatchNormStats:
    """Per-channel mean and variance of the input of every BatchNorm layer, over all images."""

    def __init__(self, model: nn.Module):
        self.sums: dict[str, list[torch.Tensor | int]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                self.handles.append(module.register_forward_hook(self._hook(name)))
                self.sums[name] = [0, 0, 0]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            s, ss = channel_moments(x)
            acc = self.sums[name]  # running sums of x and x^2 per channel, in double
            acc[0] = acc[0] + s
            acc[1] = acc[1] + ss
            acc[2] += x.numel() // x.shape[1]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def result(self, model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
        modules = dict(model.named_modules())
        out = {}
        for name, (s, ss, n) in self.sums.items():
            if not n:
                continue
            mean = s / n
            var = (ss / n - mean * mean).clamp_min(0)
            m = modules[name]
            out[name] = {"mean": mean.float().cpu().numpy(), "var": var.float().cpu().numpy(),
                         "running_mean": m.running_mean.detach().float().cpu().numpy(),
                         "running_var": m.running_var.detach().float().cpu().numpy()}
        return out


def _source_logits(pooled: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    weight = head["weight"].to(pooled)
    weight = weight.reshape(weight.shape[0], -1)  # a 1x1 conv classifier is a linear layer
    bias = head.get("bias")
    return F.linear(pooled, weight, bias.to(pooled) if bias is not None else None)


@torch.inference_mode()
def forward_stages(model: nn.Module, x: torch.Tensor, stages: Sequence[StageInfo]) -> dict[str, torch.Tensor]:
    """Globally pooled features of each stage for a batch (the model must be in eval mode)."""
    indices = [s.index for s in stages if s.index is not None]
    if indices:
        final, inters = model.forward_intermediates(x, indices=indices)
    else:
        final, inters = model.forward_features(x), []
    out = {s.key: t.float().mean(dim=(2, 3)) for s, t in zip([s for s in stages if s.index is not None], inters)}
    out[FINAL] = model.forward_head(final, pre_logits=True).float().flatten(1)
    return out


class _Entry:
    """One backbone's cache entry as the extraction pass writes it: memory-mapped features of every stage, which
    images decoded, and (clean view) the source logits and the BatchNorm input statistics."""

    def __init__(self, backbone: Backbone, n: int, views: int, directory: Path, with_stats: bool):
        self.model, self.directory, self.n = backbone.model, directory, n
        self.stages = feature_stages(self.model)
        self.arrays = {s.key: np.lib.format.open_memmap(directory / f"{s.key}.npy", mode="w+", dtype=np.float32,
                                                        shape=(views, n, s.channels)) for s in self.stages}
        self.valid = np.ones(n, dtype=bool)
        self.head = backbone.source_head if with_stats else None
        self.logits = None if self.head is None else np.lib.format.open_memmap(
            directory / "logits.npy", mode="w+", dtype=np.float32, shape=(n, backbone.source_num_classes))
        self.bn = _BatchNormStats(self.model) if with_stats else None
        self.seconds = 0.0  # this backbone's share of the pass

    def add(self, x: torch.Tensor, index: np.ndarray, ok: np.ndarray, device: torch.device) -> None:
        started = time.perf_counter()
        feats = forward_stages(self.model, x.to(device, non_blocking=True), self.stages)
        view, row = np.divmod(index, self.n)
        for key, t in feats.items():
            self.arrays[key][view, row] = t.cpu().numpy()
        self.valid[row[~ok]] = False
        if self.logits is not None:
            self.logits[row] = _source_logits(feats[FINAL], self.head).float().cpu().numpy()
        self.seconds += time.perf_counter() - started

    def close(self) -> None:
        if self.bn is not None:
            self.bn.remove()

    def write(self, samples: Sequence[Sample]) -> None:
        for a in self.arrays.values():
            a.flush()
        if self.logits is not None:
            self.logits.flush()
        np.save(self.directory / "labels.npy", np.array([s.label for s in samples], dtype=np.int64))
        np.save(self.directory / "valid.npy", self.valid)
        if self.bn is not None:
            stats = self.bn.result(self.model)
            np.savez(self.directory / "bn_stats.npz",
                     **{f"{layer}|{k}": v for layer, d in stats.items() for k, v in d.items()})
        meta = {"stages": [s.__dict__ for s in self.stages], "paths": [display_path(s.path) for s in samples]}
        (self.directory / "meta.json").write_text(json.dumps(meta))


def _extract(backbones: Sequence[Backbone], samples: Sequence[Sample], transforms: Sequence[Callable], views: int,
             seed: int, augmented: bool, directories: Sequence[Path], batch_size: int, rt: runtime.Runtime,
             max_pixels: int | None, with_stats: bool) -> list[float]:
    """One pass over `samples` through every backbone (each file decoded once for all of them), each writing its
    entry into its directory; each backbone's seconds (its forward passes plus an equal share of the loading)."""
    n = len(samples)
    entries = [_Entry(b, n, views, d, with_stats) for b, d in zip(backbones, directories)]
    sizes = [resize_size(b.data_config) for b in backbones]
    ds = _ViewDataset(samples, transforms, views, seed, max_pixels, [(size, size) for size in sizes], augmented,
                      [b.data_config["input_size"] for b in backbones])
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, **rt.loader_kwargs())
    what = (f"{n} images" + (f" x {views} augmented views" if augmented else "")
            + (f" through {len(backbones)} backbones" if len(backbones) > 1 else ""))
    started = time.perf_counter()
    try:
        # Minutes to hours on a CPU for a large folder: show progress (once per cache entry).
        # Contiguous (NCHW) layout: the BatchNorm statistics sum along W, 5x slower in channels_last.
        with contextlib.ExitStack() as stack:
            for entry in entries:
                stack.enter_context(runtime.evaluating_on(entry.model, rt.device, channels_last=False))
            stack.enter_context(rt.autocast())
            stack.enter_context(runtime.inference_threads(rt))
            for xs, index, ok in tqdm(loader, desc=f"Extracting features of {what}", unit="batch",
                                      dynamic_ncols=True):
                index, ok = index.numpy(), ok.numpy().astype(bool)
                for entry, x in zip(entries, xs):
                    entry.add(x, index, ok, rt.device)
    finally:
        for entry in entries:
            entry.close()
    loading = (time.perf_counter() - started - sum(e.seconds for e in entries)) / len(entries)
    for entry in entries:
        entry.write(samples)
    return [e.seconds + loading for e in entries]


def _load(directory: Path, extracted: bool, seconds: float) -> FeatureSet:
    meta = json.loads((directory / "meta.json").read_text())
    stages = [StageInfo(**s) for s in meta["stages"]]
    arrays = {s.key: np.load(directory / f"{s.key}.npy", mmap_mode="r") for s in stages}
    logits = np.load(directory / "logits.npy", mmap_mode="r") if (directory / "logits.npy").exists() else None
    bn: dict[str, dict[str, np.ndarray]] = {}
    if (directory / "bn_stats.npz").exists():
        with np.load(directory / "bn_stats.npz") as z:
            for k in z.files:
                layer, stat = k.rsplit("|", 1)
                bn.setdefault(layer, {})[stat] = z[k]
    speed = json.loads((directory / "speed.json").read_text()) if (directory / "speed.json").exists() else {}
    rate = speed["images"] / speed["seconds"] if speed.get("seconds") else None
    return FeatureSet(stages, arrays, np.load(directory / "labels.npy"), np.load(directory / "valid.npy"),
                      meta["paths"], directory, extracted, seconds, logits, bn, rate)


def cached_features(backbone: Backbone, samples: Sequence[Sample], *, views: int = 0, aug_preset: str = "light",
                    seed: int = 0, batch_size: int = 32, max_pixels: int | None = None,
                    cache_dir: str | Path | None = None, rt: runtime.Runtime | None = None,
                    crops: str | None = None) -> FeatureSet:
    """Features of `samples`, from the cache when the same images went through the same backbone.

    Args:
        backbone: the pretrained backbone (its classifier is ignored; the source head, when kept,
            gives the source logits).
        samples: the images, in order; labels are stored alongside.
        views: 0 for the clean view (eval preprocessing, with source logits and BatchNorm input
            statistics); K > 0 for K augmented views (training preset `aug_preset`).
        seed: seed of the augmented views.
        rt: where the backbone runs (device, precision, loader workers); this process's CPU threads
            and no workers when not given.
        crops: a multi-crop test-time mode ("5crop", "10crop"): view k is its k-th crop (no augmentation).
    """
    return cached_features_many([backbone], samples, views=views, aug_preset=aug_preset, seed=seed,
                                batch_size=batch_size, max_pixels=max_pixels, cache_dir=cache_dir, rt=rt,
                                crops=crops)[0]


@timing.timed("features")
def cached_features_many(backbones: Sequence[Backbone], samples: Sequence[Sample], *, views: int = 0,
                         aug_preset: str = "light", seed: int = 0, batch_size: int = 32,
                         max_pixels: int | None = None, cache_dir: str | Path | None = None,
                         rt: runtime.Runtime | None = None, crops: str | None = None) -> list[FeatureSet]:
    """`cached_features` of several backbones: the entries not in the cache are extracted in one pass over the
    images (each file read and decoded once for all of them: `finetune rank`), each exactly the entry that
    `cached_features` of that backbone alone would write."""
    augmented = views > 0
    transforms: list[Callable] = []
    for backbone in backbones:
        if crops is not None:
            transforms.append(CropViews(backbone.data_config, crops))
        else:
            transforms.append(train_transform(backbone.data_config, aug_preset) if augmented
                              else eval_transform(backbone.data_config))
    n_views = transforms[0].views if crops is not None else (views if augmented else 1)
    keys = [cache_key(b, samples, t, views, seed) for b, t in zip(backbones, transforms)]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directories = [root / _key_digest(key) for key in keys]
    todo = [i for i, d in enumerate(directories) if not (d / "meta.json").is_file()]
    for i, directory in enumerate(directories):
        if i not in todo:
            log.info("Features of %d images read from cache %s", len(samples), directory)
    seconds = dict.fromkeys(range(len(backbones)), 0.0)
    if todo:
        extracted = _extract_into(root, [backbones[i] for i in todo], samples, [transforms[i] for i in todo],
                                  [keys[i] for i in todo], [directories[i] for i in todo], n_views, seed, augmented,
                                  batch_size, rt or runtime.cpu(), max_pixels,
                                  with_stats=not augmented and crops is None)
        seconds.update(zip(todo, extracted))
    return [_load(d, extracted=i in todo, seconds=seconds[i]) for i, d in enumerate(directories)]


def _extract_into(root: Path, backbones: Sequence[Backbone], samples: Sequence[Sample], transforms: Sequence[Callable],
                  keys: Sequence[dict[str, Any]], directories: Sequence[Path], n_views: int, seed: int,
                  augmented: bool, batch_size: int, rt: runtime.Runtime, max_pixels: int | None,
                  with_stats: bool) -> list[float]:
    """Extract the entries into temporary folders beside their final ones, and rename each into place only once
    it is complete; each backbone's seconds."""
    root.mkdir(parents=True, exist_ok=True)
    tmps = [Path(tempfile.mkdtemp(dir=root, prefix=".partial-")) for _ in backbones]
    try:
        seconds = _extract(backbones, samples, transforms, n_views, seed, augmented, tmps, batch_size, rt,
                           max_pixels, with_stats)
        for tmp, key, directory, s in zip(tmps, keys, directories, seconds):
            (tmp / "key.json").write_text(json.dumps(key, indent=1, default=str))
            # How fast this backbone ran here: `finetune plan` estimates a run's time from it (strategy.cost).
            (tmp / "speed.json").write_text(json.dumps({"images": len(samples) * n_views, "seconds": round(s, 3)}))
            try:
                os.replace(tmp, directory)
            except OSError:  # another process finished the same entry first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("Extracted features of %d images x %d view(s) in %.1fs -> %s", len(samples), n_views, s,
                     directory)
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
    return seconds


def cached_subset(backbone: Backbone, samples: Sequence[Sample], within: Sequence[Sample] | None, **kwargs: Any
                  ) -> FeatureSet:
    """`cached_features` of `samples`, read from the entry of `within` (a list that holds them all, e.g. the
    training split that the measurement extracted): a part of a cached list costs no pass of its own.
    `within=None`: the entry of `samples` themselves."""
    if within is None:
        return cached_features(backbone, samples, **kwargs)
    row = {sample.path: i for i, sample in enumerate(within)}
    return cached_features(backbone, within, **kwargs).subset([row[sample.path] for sample in samples])
