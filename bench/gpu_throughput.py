"""GPU throughput of finetune's pipelines vs the bare model on the same GPU, as ratios from one run.

    python3 -m bench gpu_throughput                     # resnet50 @224, random weights file, 640 JPEGs
    python3 -m bench gpu_throughput --model convnext_tiny --batch-size 128

Made for the offline GPU machine (bench/gpu_check.sh calls it): nothing is downloaded. The model is
created with RANDOM weights by timm, saved to a safetensors file and loaded back through finetune's
`--weights PATH` code path (same compute as pretrained weights); the images are JPEGs of about 500 px
that this script writes (`--images`, 4 classes), decoded and resized by the pipelines like real photos.

Rows (median of `--repeats`, interleaved so a change of load hits every row alike; img/s):

* train: finetune's training pipeline (FolderDataModule with the recipe's augmentation and loader
  workers, Classifier in a pl.Trainer with the recipe's callbacks and MLflow logging; bench/throughput.py's
  `finetune_train`, here over several epochs with the first one untimed) vs a bare timm + torch loop
  (forward, cross-entropy, backward, AdamW step) on preloaded GPU tensors. Both at `--batch-size`, the
  image size and finetune's precision for training on this device (bf16-mixed on a GPU with bf16).
* predict center / predict 10crop: serve.batch_predict's loader, predict loop and CSV writer (decode, resize,
  crops, CSV writer) vs a bare eval forward under no_grad on preloaded tensors, both in the precision
  batch prediction runs in (training's, from finetune.runtime: bf16-mixed on a GPU with native bf16).
  10crop counts crops and is compared with a bare forward at 10x the batch (the crops of one batch go
  through the network together).
* feature extraction: finetune.model.features.cached_features, cold cache (every stage pooled, source
  logits, BatchNorm statistics, written to memory-mapped files), whole call including the loader's
  start, vs the bare forward at `--batch-size` in the same precision.

Prints one table and saves it as CSV under `--out` (default bench/results/).
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

os.environ.setdefault("TQDM_DISABLE", "1")  # feature extraction's progress bar; tqdm reads it when imported

import numpy as np
import torch

from bench.common import interleave, medians
from finetune.files import atomic_write

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*special characters in metric name.*")


def make_jpegs(root: Path, n: int, classes: int = 4, seed: int = 0) -> Path:
    """`n` photo-sized JPEGs (about 500 x 375, quality 90) in `classes` class folders."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % classes
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(460, 540)), int(rng.integers(340, 420))
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # smooth texture, like a photo's
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            size = int(rng.integers(40, 160))
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if c % 2 else draw.rectangle)([x, y, x + size, y + size], fill=color)
        img.save(folder / f"img{i:05d}.jpg", quality=90)
    return root


def random_weights_file(model: str, path: Path) -> Path:
    """A randomly initialised timm model saved as safetensors: `--weights PATH` without a download."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def finetune_train_epochs(args, cfg, splits, data_config, net, device, out: Path) -> float:
    """bench/throughput.py's finetune_train over `--train-epochs` epochs; the first epoch is not timed."""
    from bench import throughput as cpu  # the CPU version's loops

    return cpu.finetune_train(args, cfg, splits, data_config, net, device, out, epochs=args.train_epochs,
                              untimed_epochs=1, experiment="bench-gpu-throughput")


def finetune_predict(args, net, data_config, paths, classes, mode, device, out: Path) -> float:
    """bench/throughput.py's finetune_predict (the default single-process loop) with the model's class names."""
    from bench import throughput as cpu  # the CPU version's loops

    return cpu.finetune_predict(args, net, data_config, paths, mode, device, out, classes)


def finetune_features(args, backbone, samples, device, out: Path) -> float:
    from finetune.model.features import cached_features

    fs = cached_features(backbone, samples, batch_size=args.batch_size, cache_dir=tempfile.mkdtemp(dir=out),
                         rt=args.rt)
    assert fs.extracted, "expected a cold cache"
    return len(samples) / fs.seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="timm architecture (random weights, saved to a file)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=640, help="generated JPEGs (80%% train, 20%% val)")
    parser.add_argument("--train-epochs", type=int, default=3, help="finetune train epochs (the first untimed)")
    parser.add_argument("--bare-batches", type=int, default=24, help="batches per bare measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches at the start of bare/predict rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenario", default="large-similar", help="whose recipe (augmentation, callbacks) trains")
    parser.add_argument("--num-workers", type=int, default=None, help="default: finetune's choice from the cores")
    parser.add_argument("--workdir", default=None, help="images, weights, MLflow store (default: a temp folder)")
    parser.add_argument("--out", default="bench/results", help="folder for the CSV")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to test this script)")
    return parser


def _inputs(args) -> tuple[Path, Path, Path]:
    """(work folder, generated images, random weights file), made once per work folder."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work.resolve()}/mlflow.db")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    data = work / "images"
    if not data.is_dir():
        make_jpegs(data, args.images)
    weights = work / f"{args.model}.random.safetensors"
    if not weights.is_file():
        random_weights_file(args.model, weights)
    print(f"setup: {args.images} JPEGs and {weights.name} in {time.perf_counter() - started:.1f}s ({work})",
          flush=True)
    return work, data, weights


def _measures(args, cfg, splits, backbone, device, work: Path) -> list:
    """The rows, each a (name, callable returning img/s); the bare rows run on batches preprocessed once, on the
    device, so they pay for the model only."""
    from bench import throughput as cpu  # the CPU version's bare loops
    from finetune.data.images import load_rgb
    from finetune.data.transforms import eval_transform, resize_size

    data_config = backbone.data_config
    size = resize_size(data_config)
    samples = splits.train + splits.val
    paths = [s.path for s in samples]
    prep = eval_transform(data_config)
    pool = torch.stack([prep(load_rgb(p, draft_size=(size, size))) for p in paths[:args.batch_size * 4]])

    def batches(batch: int, count: int) -> list[torch.Tensor]:
        idx = torch.arange(batch * count) % len(pool)
        return [pool[idx[i * batch:(i + 1) * batch]].to(device) for i in range(count)]

    train_batches = batches(args.batch_size, args.bare_batches)
    train_labels = [torch.randint(0, len(splits.classes), (args.batch_size,), device=device) for _ in train_batches]
    fwd_batches = batches(args.batch_size, args.bare_batches)
    crop_batches = batches(args.batch_size * 10, max(args.warmup + 2, args.bare_batches // 4))
    bare_net = copy.deepcopy(backbone.model).to(device)
    ft_net = copy.deepcopy(backbone.model)
    ft_net_predict = copy.deepcopy(backbone.model).eval()
    return [
        ("bare train", lambda: cpu.bare_train(bare_net, train_batches, train_labels, cfg, device,
                                              args.train_precision, args.warmup)),
        ("train", lambda: finetune_train_epochs(args, cfg, splits, data_config, ft_net, device, work)),
        ("bare forward", lambda: cpu.bare_forward(bare_net, fwd_batches, device, args.precision, args.warmup)),
        ("bare forward 10x", lambda: cpu.bare_forward(bare_net, crop_batches, device, args.precision, args.warmup)),
        ("predict center", lambda: finetune_predict(args, ft_net_predict, data_config, paths, splits.classes,
                                                    "center", device, work)),
        ("predict 10crop", lambda: finetune_predict(args, ft_net_predict, data_config, paths, splits.classes,
                                                    "10crop", device, work)),
        ("feature extraction", lambda: finetune_features(args, backbone, samples, device, work)),
    ]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("CUDA not available: GPU throughput not measured (--allow-cpu runs it on the CPU).")
        return
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning", "lightning_fabric",
                  "lightning.pytorch.utilities.rank_zero", "mlflow", "alembic", "finetune"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from finetune import runtime
    from finetune.config import TrainConfig
    from finetune.data.folders import scan_folder
    from finetune.model.backbone import create_backbone
    from finetune.model.heads import init_head

    # The product's own decision for this process: device, precision (training's, also used by batch
    # prediction and feature extraction), loader workers.
    args.rt = runtime.configure(workers=args.num_workers)
    device = args.rt.device
    args.train_precision = args.precision = args.rt.precision
    args.num_workers = args.rt.workers
    torch.backends.cudnn.benchmark = False  # Lightning's default; the bare loops run with the same setting

    started = time.perf_counter()
    work, data, weights = _inputs(args)
    cfg = TrainConfig(data_dir=str(data), model=args.model, weights=str(weights), batch_size=args.batch_size,
                      image_size=args.image_size, scenario=args.scenario)
    splits = scan_folder(data)
    backbone = create_backbone(args.model, str(weights), len(splits.classes), args.image_size,
                               keep_source_head=True)
    init_head(backbone.model)
    rows = interleave(_measures(args, cfg, splits, backbone, device, work), args.repeats,
                      line="  repeat {repeat}: {name:<20}{value:9.1f} img/s")
    _report(args, rows, device, started)


def _report(args, rows: dict[str, list[float]], device, started: float) -> None:
    """The markdown table of finetune against bare, printed and saved as CSV under --out."""
    med = medians(rows)
    table = [  # row, finetune, bare reference, precision, what is counted
        ("train", "train", "bare train", args.train_precision, "images"),
        ("predict center", "predict center", "bare forward", args.precision, "images"),
        ("predict 10crop", "predict 10crop", "bare forward 10x", args.precision, "crops (bare at 10x batch)"),
        ("feature extraction", "feature extraction", "bare forward", args.precision, "images, cold cache, whole call"),
    ]
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    header = (f"{args.model} (random weights file) @{args.image_size}, batch {args.batch_size}, {gpu}, "
              f"{args.images} generated JPEGs ~500 px, loader workers {args.num_workers}, "
              f"torch {torch.__version__}, median of {args.repeats}")
    print()
    print(header)
    print(f"| {'what':<18} | {'finetune img/s':>14} | {'bare img/s':>10} | {'ratio':>5} | precision  | counted")
    print(f"|{'-' * 20}|{'-' * 16}|{'-' * 12}|{'-' * 7}|------------|--------")
    out_rows = []
    for label, ft, bare, precision, counted in table:
        ratio = med[ft] / med[bare]
        print(f"| {label:<18} | {med[ft]:14.1f} | {med[bare]:10.1f} | {ratio:5.2f} | {precision:<10} | {counted}")
        out_rows.append({"what": label, "finetune_img_s": round(med[ft], 1), "bare_img_s": round(med[bare], 1),
                         "ratio": round(ratio, 3), "precision": precision, "counted": counted,
                         "finetune_runs": " ".join(f"{v:.1f}" for v in rows[ft]),
                         "bare_runs": " ".join(f"{v:.1f}" for v in rows[bare]), "setup": header})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"gpu-throughput-{args.model}-{args.image_size}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    with atomic_write(csv_path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out_rows[0]))
        w.writeheader()
        w.writerows(out_rows)
    print(f"saved {csv_path} (total {time.perf_counter() - started:.0f}s)")
