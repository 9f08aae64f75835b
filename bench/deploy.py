"""Deployment throughput: the same trained model run by eager PyTorch and by ONNX Runtime (fp32, int8).

    uv run --frozen python bench/deploy.py                       # trains a small-similar model first
    uv run --frozen python bench/deploy.py --model-uri models:/NAME@champion --data DIR

Defaults: hymenoptera (../shared/data) with the shared mobilenetv2_100 weights (../shared/weights), a
linear head trained by `finetune train --scenario small-similar --epochs 1 --tta center` into a bench-only
MLflow store (outputs/bench-deploy/mlruns), exported by `finetune export --quantize int8` (which checks
the fp32 file against PyTorch and reports int8's val accuracy).

Every row runs the whole val split, preprocessed once beforehand (centre crop, not timed), in batches of
32; rows are interleaved (row 1, row 2, ..., row 1, ...) so a load change on the machine hits them all,
and each row's images/s is the median of the repeats. Each row also gives its val accuracy and its label
agreement with bare eager. A row is a function `row_*(ctx) -> Row` whose `run()` predicts the whole val
split and returns the labels: the rows for batch prediction (torch / onnx) and REST (torch / onnx) go in
`ROWS` the same way once the pyfunc model takes `--runtime onnx`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
import os
from pathlib import Path
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_DATA = SHARED / "data" / "hymenoptera"
DEFAULT_WEIGHTS = SHARED / "weights" / "mobilenetv2_100.coral_in1k.safetensors"


@dataclass
class Context:
    """What the rows share: the model, its ONNX files, the val split preprocessed, the settings."""

    model_uri: str
    net: torch.nn.Module
    spec: object
    onnx_dir: Path
    batches: list[torch.Tensor]
    labels: torch.Tensor
    paths: list[str]
    threads: int
    extra: dict = field(default_factory=dict)


@dataclass
class Row:
    name: str
    run: Callable[[], torch.Tensor]  # predicts the whole val split: labels [N]
    seconds: list[float] = field(default_factory=list)
    labels: torch.Tensor | None = None


def row_eager(ctx: Context) -> Row:
    net = ctx.net.cpu().eval()

    def run() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([net(b).argmax(1) for b in ctx.batches])
    return Row("bare eager fp32", run)


def _onnx_row(ctx: Context, name: str, file: Path) -> Row:
    from finetune.model.onnx import OnnxRunner

    runner = OnnxRunner(file, threads=ctx.threads)
    return Row(name, lambda: torch.cat([runner(b)[0].argmax(1) for b in ctx.batches]))


def row_onnx_fp32(ctx: Context) -> Row:
    return _onnx_row(ctx, "ONNX Runtime fp32", ctx.onnx_dir / "model.onnx")


def row_onnx_int8(ctx: Context) -> Row:
    return _onnx_row(ctx, "ONNX Runtime int8", ctx.onnx_dir / "model.int8.onnx")


def variant_rows(ctx: Context) -> list[Row]:
    """int8 as QOperator / QDQ x per-channel on / off (--variants), to choose quantize_int8's defaults."""
    from finetune.model.onnx import quantize_int8

    calibration = ctx.extra["calibration"]
    rows = []
    for fmt in ("QDQ", "QOperator"):
        for per_channel in (False, True):
            path = ctx.onnx_dir.parent / f"variant-{fmt}-{'pc' if per_channel else 'pt'}.onnx"
            quantize_int8(ctx.onnx_dir / "model.onnx", path, calibration, per_channel=per_channel, quant_format=fmt)
            rows.append(_onnx_row(ctx, f"  int8 {fmt} {'per-channel' if per_channel else 'per-tensor'}", path))
    return rows


ROWS = [row_eager, row_onnx_fp32, row_onnx_int8]  # batch prediction torch/onnx, REST torch/onnx: later


def train_model(data: Path, weights: Path, out: Path) -> str:
    """`finetune train --scenario small-similar` in a subprocess; returns the logged model's URI."""
    cmd = [sys.executable, "-m", "finetune.cli", "train", str(data), "--model", "mobilenetv2_100", "--weights",
           str(weights), "--scenario", "small-similar", "--epochs", "1", "--tta", "center", "--output", str(out)]
    subprocess.run(cmd, check=True, cwd=out.parent, stdout=subprocess.DEVNULL)
    import json

    return json.loads((out / "summary.json").read_text())["model_uri"]


def export(model_uri: str, data: Path, out: Path) -> dict:
    from finetune.workflows.export import ExportOptions, export_model

    return export_model(model_uri, ExportOptions(quantize="int8", data_dir=str(data), output=str(out),
                                                 max_loss=100.0))  # the bench reports the loss, never refuses


def measure(rows: list[Row], repeats: int, images: int) -> None:
    for row in rows:  # warm-up: allocator, kernels, ORT's first-run graph work; its labels are kept
        row.labels = row.run()
    for _ in range(repeats):
        for row in rows:
            start = time.perf_counter()
            row.run()
            row.seconds.append(time.perf_counter() - start)


def print_table(rows: list[Row], labels: torch.Tensor, repeats: int) -> None:
    n = len(labels)
    base = n / statistics.median(rows[0].seconds)
    print(f"{'row':<34}{'images/s':>10}{'ratio':>8}{'val acc':>9}{'agree':>8}   (median of {repeats}; min-max img/s)")
    for row in rows:
        speeds = [n / s for s in row.seconds]
        ips = statistics.median(speeds)
        acc = float((row.labels == labels).float().mean())
        agree = float((row.labels == rows[0].labels).float().mean())
        print(f"{row.name:<34}{ips:>10.1f}{ips / base:>7.2f}x{100 * acc:>8.2f}%{agree:>8.3f}"
              f"   ({min(speeds):.0f}-{max(speeds):.0f})")


def val_split(spec, data: Path, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    from finetune.data.folders import scan_folder
    from finetune.workflows.export import preprocessed

    splits = scan_folder(data)
    samples = splits.val or splits.test
    images = preprocessed(samples, spec.data_config)
    labels = torch.tensor([spec.class_names.index(splits.classes[s.label]) for s in samples])
    return list(images.split(batch_size)), labels, [s.path for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="a logged/registered model (default: train one)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "bench-deploy")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", action="store_true", help="also int8 QDQ/QOperator x per-channel on/off")
    args = parser.parse_args()

    args.output.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.output.resolve()}/mlflow.db")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    uri = args.model_uri or train_model(args.data.resolve(), args.weights.resolve(), args.output / "train")
    report = export(uri, args.data, args.output / "export")
    from finetune.tracking.pyfunc import load_logged_model

    model = load_logged_model(uri)
    batches, labels, paths = val_split(model.spec, args.data, args.batch_size)
    ctx = Context(uri, model.net, model.spec, Path(report["output"]), batches, labels, paths, args.threads)
    rows = [make(ctx) for make in ROWS]
    if args.variants:
        from finetune.data.folders import scan_folder
        from finetune.workflows.export import CALIBRATION_IMAGES, preprocessed, spread

        ctx.extra["calibration"] = preprocessed(spread(scan_folder(args.data).train, CALIBRATION_IMAGES),
                                                model.spec.data_config)
        rows += variant_rows(ctx)
    measure(rows, args.repeats, len(labels))
    q = report["int8"]
    print(f"{model.spec.architecture} @{model.spec.data_config['input_size'][-1]}px, {len(labels)} val images, "
          f"batch {args.batch_size}, {args.threads} threads; export check: fp32 max |dprob| "
          f"{report['fp32']['max_abs_prob_diff']:.2g}, int8 val acc {100 * q['val_acc_fp32']:.2f}% -> "
          f"{100 * q['val_acc_int8']:.2f}%")
    print_table(rows, labels, args.repeats)
    print(f"(bench total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
