"""Batch prediction with multi-crop TTA vs the bare model forward on the same number of crops.

    uv run python -m bench tta_throughput --model-uri models:/NAME@champion --input ../shared/data/hymenoptera/val

Bare: the crops of every image are built beforehand (not timed); only `net(crops)` is timed, in the
same batch shape the pipeline uses. Pipeline: `serve.batch_predict.predict_to_file` end to end
(file listing, each image decoded and resized once, crops, DataLoader, the predict loop, CSV
writing, rename). Both run in this process, one after the other, bare timed before and after the
pipeline so a load change on the machine shows up. Prints crops/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from finetune import tracking
from finetune.data.folders import iter_image_files
from finetune.data.images import load_rgb
from finetune.data.crops import TTA_VIEWS, CropViews
from serve.batch_predict import predict_to_file


def bare_forward_seconds(net: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for crops in batches:
            net(crops)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--input", required=True, help="folder of images")
    parser.add_argument("--tta", default="10crop", choices=list(TTA_VIEWS))
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (x crops per forward)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    args = parser.parse_args(argv)

    tracking.client()
    model = mlflow.pyfunc.load_model(args.model_uri).unwrap_python_model()
    net, spec = model.net.cpu().eval(), model.spec
    paths = iter_image_files(args.input)
    if args.limit:
        paths = paths[:args.limit]
    views = TTA_VIEWS[args.tta]
    crop = CropViews(spec.data_config, args.tta)
    all_views = [crop(load_rgb(p)) for p in paths]
    batches = [torch.cat(all_views[i:i + args.batch_size]) for i in range(0, len(all_views), args.batch_size)]
    n_crops = len(paths) * views

    bare_forward_seconds(net, batches[:2])  # warm-up: allocator, kernels
    bare = [bare_forward_seconds(net, batches)]
    with tempfile.TemporaryDirectory() as tmp:
        predict_to_file(args.model_uri, paths[:args.batch_size], Path(tmp) / "warmup.csv", tta=args.tta,
                        batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
        start = time.perf_counter()
        result = predict_to_file(args.model_uri, paths, Path(tmp) / "preds.csv", tta=args.tta, batch_size=args.batch_size,
                                 num_workers=args.num_workers, progress=False)
        pipeline = time.perf_counter() - start
    bare.append(bare_forward_seconds(net, batches))
    assert result["predicted"] == len(paths)

    bare_s = statistics.mean(bare)
    print(f"{len(paths)} images x {views} crops = {n_crops} crops, batch {args.batch_size} images, "
          f"{args.num_workers} worker(s), torch threads {torch.get_num_threads()}")
    print(f"{'what':<42}{'seconds':>9}{'crops/s':>10}")
    print(f"{'bare forward (mean of before/after)':<42}{bare_s:>9.2f}{n_crops / bare_s:>10.1f}"
          f"   (before {bare[0]:.2f}s, after {bare[1]:.2f}s)")
    print(f"{'batch_predict --tta ' + args.tta + ' (end to end)':<42}{pipeline:>9.2f}{n_crops / pipeline:>10.1f}")
    print(f"ratio pipeline / bare throughput: {bare_s / pipeline:.3f}")
