"""Throughput of finetune's pipelines vs the bare model, measured side by side in one process.

    uv run python -m bench throughput --data ../shared/data/hymenoptera --model mobilenetv2_100 \
        --weights ../shared/weights/mobilenetv2_100.coral_in1k.safetensors --image-size 224

Per repeat, interleaved (so a load change on the machine hits every row alike), in images/s:

* ``bare train``: forward + backward + optimizer step of the model alone on preloaded tensors;
* ``finetune train``: `FolderDataModule` + `Classifier` in a `pl.Trainer` with the recipe's callbacks
  and MLflow logging on; only steady-state steps are timed (a callback stamps batch ends after
  ``--warmup`` batches), data loading and augmentation included;
* ``bare forward``: eval forward under no_grad on preloaded tensors;
* ``finetune predict center`` / ``10crop``: `serve.batch_predict`'s loader and its single-process
  predict loop (decode, resize, crops, CSV writer), steady-state batches; 10crop counts crops;
* ``finetune features``: `finetune.model.features.cached_features` (cold cache) when present: the
  whole call, and its batches after the first (timed like the predict rows).

The median over ``--repeats`` is reported with the ratios finetune/bare, and saved as CSV under
``bench/results/``. Model options (``--channels-last``, ``--compile``, ``--precision``) apply to bare
and finetune alike, so a ratio measures the pipeline, not a different computation.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from bench.common import DATA, interleave, medians
from finetune import runtime
from finetune import tracking
from finetune.data.transforms import eval_transform, resize_size, train_transform
from finetune.model.backbone import create_backbone
from finetune.training.callbacks import recipe_callbacks
from finetune.config import TrainConfig
from finetune.data.loaders import FolderDataModule
from finetune.files import atomic_write
from finetune.data.folders import scan_folder
from finetune.data.images import load_rgb
from finetune.training.module import Classifier
from finetune.training.optim import create_optimizer, make_optimizer_factory
from finetune.model.heads import init_head
from finetune.training.recipe import resolve_recipe
from finetune.data.crops import CropViews
from finetune.data.crops import TTA_VIEWS
from serve.batch_predict import RowWriter, predict_rows, prediction_loader

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*LightningDeprecationWarning.*")


class BatchClock(pl.Callback):
    """Stamps the end of every train/predict batch; images/s over the batches after the warm-up."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.stamps: list[tuple[float, int]] = []

    def _stamp(self, batch) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        n = x.shape[0] * (x.shape[1] if x.ndim == 5 else 1)  # [B, views, C, H, W]: count crops
        self.stamps.append((time.perf_counter(), n))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stamp(batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._stamp(batch)

    def images_per_s(self) -> float:
        # From the end of the last warm-up batch to the end of the last batch.
        if len(self.stamps) <= self.warmup:
            raise SystemExit(f"only {len(self.stamps)} batches for warm-up {self.warmup}: use more images or "
                             "a smaller --warmup")
        images = sum(n for _, n in self.stamps[self.warmup:])
        return images / (self.stamps[-1][0] - self.stamps[self.warmup - 1][0])


def _synced_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def bare_train(net, batches, labels, cfg, device, precision, warmup) -> float:
    net.train()
    opt = create_optimizer(cfg, [{"params": list(net.parameters()), "lr": cfg.lr, "name": "all"}])
    stamps = []
    for i, x in enumerate(batches):
        if i == warmup:
            stamps.append(_synced_clock(device))
        with _autocast(device, precision):
            loss = F.cross_entropy(net(x), labels[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    stamps.append(_synced_clock(device))
    return sum(x.shape[0] for x in batches[warmup:]) / (stamps[-1] - stamps[0])


@torch.no_grad()
def bare_forward(net, batches, device, precision, warmup) -> float:
    net.eval()
    for x in batches[:warmup]:
        with _autocast(device, precision):
            net(x)
    start = _synced_clock(device)
    for x in batches[warmup:]:
        with _autocast(device, precision):
            net(x)
    return sum(x.shape[0] for x in batches[warmup:]) / (_synced_clock(device) - start)


def trainer_kwargs(args, device) -> dict:
    return dict(accelerator=device.type if device.type == "cuda" else "cpu", devices=1,
                precision=args.precision, enable_model_summary=False, enable_checkpointing=False,
                enable_progress_bar=False, num_sanity_val_steps=0, log_every_n_steps=1)


def finetune_train(args, cfg, splits, data_config, net, device, out: Path, epochs: int = 1,
                   untimed_epochs: int = 0, experiment: str = "bench-throughput") -> float:
    """finetune's training pipeline (DataModule, recipe, Classifier, callbacks, MLflow logging).

    By default one epoch of `--train-batches` with `--warmup` untimed batches; with `untimed_epochs`,
    `epochs` whole epochs of which the first ones are warm-up (bench/gpu_throughput.py: workers
    starting, cuDNN autotune)."""
    recipe = resolve_recipe(cfg, args.scenario)
    size = resize_size(data_config)
    dm = FolderDataModule(splits, train_transform(data_config, recipe.augment), eval_transform(data_config),
                          batch_size=args.batch_size, num_workers=args.rt.workers, pin_memory=args.rt.pin_memory,
                          max_pixels=cfg.max_image_pixels, draft_size=(size, size))
    module = Classifier(net, len(splits.classes),
                        make_optimizer_factory(cfg, [{"params": list(net.parameters()), "lr": cfg.lr, "name": "all"}],
                                               recipe.schedule, recipe.warmup_epochs),
                        label_smoothing=recipe.label_smoothing)
    experiment_id = tracking.ensure_experiment(experiment)
    run_id = tracking.client().create_run(experiment_id, run_name=experiment).info.run_id
    from pytorch_lightning.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name=experiment, tracking_uri=tracking.tracking_uri(), run_id=run_id)
    clock = BatchClock(untimed_epochs * len(dm.train_dataloader()) if untimed_epochs else args.warmup)
    precision = getattr(args, "train_precision", args.precision)
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=None if untimed_epochs else args.train_batches,
                         limit_val_batches=0, logger=logger,
                         callbacks=[clock, *recipe_callbacks(recipe, len(splits.classes), None)],
                         default_root_dir=out, **{**trainer_kwargs(args, device), "precision": precision})
    trainer.fit(module, datamodule=dm)
    tracking.client().set_terminated(run_id, "FINISHED")
    return clock.images_per_s()


def finetune_predict(args, net, data_config, paths, mode, device, out: Path, classes=("c0", "c1")) -> float:
    """The default (single-process) batch-prediction loop with its row writer; the clock stamps each
    written batch, as BatchClock does for Lightning's loops."""
    clock = BatchClock(args.warmup)

    class StampedRows(RowWriter):
        def write(self, probs, index, errors, ood=None):
            super().write(probs, index, errors, ood)
            clock.stamps.append((time.perf_counter(), len(index) * TTA_VIEWS[mode]))

    loader = prediction_loader(paths, data_config, mode, args.batch_size, args.rt, None)
    predict_rows(net, loader, StampedRows(out / f"preds-{mode}.csv", paths, list(classes), 1), args.rt,
                 progress=False)
    return clock.images_per_s()


def finetune_features(args, backbone, splits, device, out: Path) -> tuple[float, float] | None:
    """Images/s of a cold-cache `cached_features` call: the whole call, and after its first batch (the
    predict rows' clock: the loader's start and first batch untimed, as the bare row's decoding is)."""
    try:
        from finetune.model import features
    except ImportError:
        return None
    samples = splits.val[:args.predict_images]
    clock = BatchClock(args.warmup)
    forward = features.forward_stages

    def stamped(model, x, stages):  # the extraction loop looks forward_stages up at each batch
        out_ = forward(model, x, stages)
        _synced_clock(device)
        clock.stamps.append((time.perf_counter(), x.shape[0]))
        return out_

    features.forward_stages = stamped
    try:
        fs = features.cached_features(backbone, samples, batch_size=args.batch_size,
                                      cache_dir=tempfile.mkdtemp(dir=out), rt=args.rt)
    finally:
        features.forward_stages = forward
    return len(samples) / fs.seconds, clock.images_per_s()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "hymenoptera"))
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--weights", default="none", help="none, hub or a weights file (same compute either way)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scenario", default="large-similar", help="whose default recipe (augmentation) trains")
    parser.add_argument("--num-workers", type=int, default=None, help="default: finetune's choice from the cores")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: finetune's choice)")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (bare and finetune)")
    parser.add_argument("--warmup", type=int, default=1, choices=range(1, 100), metavar="N",
                        help="batches not timed at the start of each measurement")
    parser.add_argument("--train-batches", type=int, default=6, help="train batches per measurement (incl. warm-up)")
    parser.add_argument("--predict-images", type=int, default=96, help="images per predict measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="a,b,c,x,d,f", help="which rows: a=train bare, b=train finetune, "
                        "c=forward bare, x=forward bare at 10x batch, d=predict finetune, f=features "
                        "(e.g. c,f: the extraction row and its reference only)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--out", default="bench/results")
    return parser


def _preloaded(args, splits, data_config, device) -> tuple[list, list, list[str], list, list]:
    """Real images, preprocessed once, on the device: the bare rows only pay for the model. (train batches,
    their labels, the predict rows' paths, forward batches, forward batches at 10x)."""
    size = resize_size(data_config)
    n_train = args.train_batches * args.batch_size
    train_imgs = [eval_transform(data_config)(load_rgb(s.path, draft_size=(size, size)))
                  for s in (splits.train * 4)[:n_train]]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    train_batches = [torch.stack(train_imgs[i:i + args.batch_size]).to(device).contiguous(memory_format=fmt)
                     for i in range(0, n_train, args.batch_size)]
    train_labels = [torch.randint(0, len(splits.classes), (args.batch_size,), device=device) for _ in train_batches]
    paths = [s.path for s in (splits.val + splits.train)][:args.predict_images]
    crops = CropViews(data_config, "center")
    center = [crops(load_rgb(p, draft_size=(size, size)))[0] for p in paths]
    fwd_batches = [torch.stack(center[i:i + args.batch_size]).to(device).contiguous(memory_format=fmt)
                   for i in range(0, len(center), args.batch_size)]
    crop_batches = [torch.cat([b] * 10) for b in fwd_batches]  # 10x the crops per forward, as 10crop runs
    return train_batches, train_labels, paths, fwd_batches, crop_batches


def _prepared(args, net, device):
    net = net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return torch.compile(net) if args.compile else net


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("pytorch_lightning", "lightning", "lightning_fabric", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    args.rt = runtime.configure(args.accelerator, precision=args.precision, workers=args.num_workers,
                                threads=args.threads)
    device = args.rt.device
    args.num_workers = args.rt.workers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="throughput-", dir=out))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work.resolve()}/mlflow.db")

    cfg = TrainConfig(data_dir=args.data, model=args.model, weights=args.weights, batch_size=args.batch_size,
                      image_size=args.image_size, scenario=args.scenario)
    splits = scan_folder(args.data)
    backbone = create_backbone(args.model, args.weights, len(splits.classes), args.image_size)
    init_head(backbone.model)
    data_config = backbone.data_config
    train_batches, train_labels, paths, fwd_batches, crop_batches = _preloaded(args, splits, data_config, device)
    bare_net = _prepared(args, backbone.model, device)
    ft_net = _prepared(args, copy.deepcopy(backbone.model), device)

    measures = [
        ("a", "bare train step", lambda: bare_train(bare_net, train_batches, train_labels, cfg, device,
                                                     args.precision, args.warmup)),
        ("b", "finetune train (DataModule+Trainer+MLflow)",
         lambda: finetune_train(args, cfg, splits, data_config, ft_net, device, work)),
        ("c", "bare forward", lambda: bare_forward(bare_net, fwd_batches, device, args.precision, args.warmup)),
        ("x", "bare forward, 10x batch (per crop)",
         lambda: bare_forward(bare_net, crop_batches, device, args.precision, args.warmup)),
        ("d", "finetune predict center",
         lambda: finetune_predict(args, ft_net, data_config, paths, "center", device, work)),
        ("d", "finetune predict 10crop (per crop)",
         lambda: finetune_predict(args, ft_net, data_config, paths, "10crop", device, work)),
        ("f", ("finetune features (cold cache)", "finetune features, after 1st batch"),
         lambda: finetune_features(args, backbone, splits, device, work)),
    ]
    only = set(args.only.split(","))
    rows = interleave([(name, fn) for key, name, fn in measures if key in only], args.repeats)
    _report(args, rows, device, out)


# Each finetune row and the bare row it is compared with.
RATIOS = {
    "finetune train (DataModule+Trainer+MLflow)": "bare train step",
    "finetune predict center": "bare forward",
    "finetune predict 10crop (per crop)": "bare forward, 10x batch (per crop)",
    "finetune features (cold cache)": "bare forward",
    "finetune features, after 1st batch": "bare forward",
}


def _report(args, rows: dict[str, list[float]], device, out: Path) -> None:
    """The table of medians and ratios, printed and saved as CSV under `out`."""
    med = medians(rows)
    load = os.getloadavg()[0]
    header = (f"{args.model} @{args.image_size}, batch {args.batch_size}, {device.type}, precision {args.precision}, "
              f"channels_last {args.channels_last}, compile {args.compile}, torch threads {args.rt.threads}, "
              f"workers {args.num_workers}, repeats {args.repeats}, load {load:.2f}")
    print(header)
    print(f"{'what':<46}{'img/s':>9}{'ratio':>8}  vs")
    table = []
    for name, value in med.items():
        ref = RATIOS.get(name)
        ratio = value / med[ref] if ref in med else None
        table.append({"what": name, "images_per_s": round(value, 2), "ratio": round(ratio, 3) if ratio else "",
                      "vs": ref or "", "runs": " ".join(f"{v:.1f}" for v in rows[name])})
        print(f"{name:<46}{value:9.1f}{'' if ratio is None else f'{ratio:8.2f}':>8}  {ref or ''}")
    if "finetune predict 10crop (per crop)" in med and "bare forward" in med:
        print(f"10crop per crop vs bare forward at batch {args.batch_size}: "
              f"{med['finetune predict 10crop (per crop)'] / med['bare forward']:.2f}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    csv_path = out / f"throughput-{args.model}-{args.image_size}-{stamp}.csv"
    with atomic_write(csv_path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=["what", "images_per_s", "ratio", "vs", "runs", "setup"])
        w.writeheader()
        for row in table:
            w.writerow({**row, "setup": header})
    print(f"saved {csv_path}")
