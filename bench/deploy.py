"""Deployment throughput: the same trained model run by eager PyTorch and by ONNX Runtime (fp32, int8).

    uv run --frozen python -m bench deploy                       # trains a small-similar model first
    uv run --frozen python -m bench deploy --model-uri models:/NAME@champion --data DIR

Defaults: hymenoptera (../shared/data) with the shared mobilenetv2_100 weights (../shared/weights), a
linear head trained by `finetune train --scenario small-similar --epochs 1 --tta center` into a bench-only
MLflow store (outputs/bench-deploy/mlruns), exported by `finetune export --quantize int8` (which checks
the fp32 file against PyTorch and reports int8's val accuracy).

Every row runs the whole val split, preprocessed once beforehand (centre crop, not timed), in batches of
32; rows are interleaved (row 1, row 2, ..., row 1, ...) so a load change on the machine hits them all,
and each row's images/s is the median of the repeats. Each row also gives its val accuracy and its label
agreement with bare eager. A row is a function `row_*(ctx) -> Row` whose `run()` predicts the whole val
split and returns the labels. The model rows (eager, ONNX Runtime fp32 / int8) time the forward pass on
preprocessed tensors; the batch prediction rows run `serve.batch_predict` over the val files (decoding,
crops, calibrated scores, unknown score, CSV) on torch, ONNX fp32 and ONNX int8 (the `model_onnx` version the
export logs); the REST rows start `mlflow models serve` on that version (FINETUNE_RUNTIME torch or onnx) and
send the val images from 4 concurrent clients, 8 images a request, base64 in `dataframe_split`.
"""

from __future__ import annotations

import argparse
import base64
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import os
from pathlib import Path
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from bench.common import DATA, DEFAULT_WEIGHTS, ROOT

DEFAULT_DATA = DATA / "hymenoptera"


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


def _batch_row(ctx: Context, name: str, uri: str, runtime_name: str) -> Row:
    """`serve.batch_predict` over the val files (decode, crop, predict, write the CSV), on one runtime."""
    from serve.batch_predict import predict_to_file
    import pandas as pd

    out = ctx.onnx_dir.parent / f"batch-{runtime_name}.csv"

    def run() -> torch.Tensor:
        predict_to_file(uri, ctx.paths, out, batch_size=32, num_workers=ctx.extra["workers"], progress=False,
                        runtime_name=runtime_name)
        by_path = pd.read_csv(out).set_index("path")["label"]
        return torch.tensor([ctx.spec.class_names.index(by_path[p]) for p in ctx.paths])
    return Row(name, run)


def row_batch_torch(ctx: Context) -> Row:
    return _batch_row(ctx, "batch prediction, torch", ctx.model_uri, "torch")


def row_batch_onnx(ctx: Context) -> Row:
    return _batch_row(ctx, "batch prediction, ONNX fp32", ctx.extra["onnx_uri"], "onnx")


def row_batch_int8(ctx: Context) -> Row:
    return _batch_row(ctx, "batch prediction, ONNX int8", ctx.extra["onnx_uri"], "onnx-int8")


def _rest_row(ctx: Context, name: str, runtime_name: str) -> Row:
    """`mlflow models serve` of the ONNX version with FINETUNE_RUNTIME=<runtime>; CLIENTS concurrent clients send
    the val images REQUEST_IMAGES at a time (base64 PNG-or-JPEG bytes, `dataframe_split`) until all are done."""
    server = RestServer(ctx.extra["onnx_uri"], runtime_name, ctx.threads)
    ctx.extra.setdefault("servers", []).append(server)
    payloads = [[base64.b64encode(Path(p).read_bytes()).decode() for p in ctx.paths[i:i + REQUEST_IMAGES]]
                for i in range(0, len(ctx.paths), REQUEST_IMAGES)]

    def run() -> torch.Tensor:
        server.start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            labels = [label for part in pool.map(server.predict, payloads) for label in part]
        return torch.tensor([ctx.spec.class_names.index(label) for label in labels])
    return Row(name, run)


def row_rest_torch(ctx: Context) -> Row:
    return _rest_row(ctx, "REST (mlflow models serve), torch", "torch")


def row_rest_onnx(ctx: Context) -> Row:
    return _rest_row(ctx, "REST (mlflow models serve), ONNX fp32", "onnx")


CLIENTS, REQUEST_IMAGES, SERVER_START_S = 4, 8, 300


class RestServer:
    """One `mlflow models serve` process (started on first use, stopped at the end of the bench)."""

    def __init__(self, uri: str, runtime_name: str, threads: int):
        self.uri, self.runtime_name, self.threads = uri, runtime_name, threads
        self.process = None
        self.base = ""

    def start(self) -> None:
        import socket
        import urllib.request

        if self.process is not None:
            return
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
        env = {**os.environ, "FINETUNE_RUNTIME": self.runtime_name}
        self.process = subprocess.Popen([mlflow_cli, "models", "serve", "-m", self.uri, "--env-manager", "local",
                                         "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.base}/ping", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"mlflow models serve ({self.runtime_name}) did not start in {SERVER_START_S} s")

    def predict(self, images: list[str]) -> list[str]:
        import json
        import urllib.request

        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}).encode()
        request = urllib.request.Request(f"{self.base}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return [row["label"] for row in json.loads(response.read())["predictions"]]

    def stop(self) -> None:
        import signal

        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


ROWS = [row_eager, row_onnx_fp32, row_onnx_int8, row_batch_torch, row_batch_onnx, row_batch_int8,
        row_rest_torch, row_rest_onnx]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="a logged/registered model (default: train one)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "bench-deploy")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", action="store_true", help="also int8 QDQ/QOperator x per-channel on/off")
    parser.add_argument("--workers", type=int, default=0, help="batch prediction's loader workers")
    parser.add_argument("--no-rest", dest="rest", action="store_false", help="skip the REST rows (servers)")
    args = parser.parse_args(argv)

    args.output.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.output.resolve()}/mlflow.db")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    uri = args.model_uri or train_model(args.data.resolve(), args.weights.resolve(), args.output / "train")
    report = export(uri, args.data, args.output / "export")
    from finetune.tracking.pyfunc import load_logged_model

    model = load_logged_model(uri)
    batches, labels, paths = val_split(model.spec, args.data, args.batch_size)
    ctx = Context(uri, model.net, model.spec, Path(report["output"]), batches, labels, paths, args.threads,
                  extra={"onnx_uri": report["model_uri_onnx"], "workers": args.workers})
    rows = [make(ctx) for make in ROWS if args.rest or not make.__name__.startswith("row_rest")]
    if args.variants:
        from finetune.data.folders import scan_folder
        from finetune.workflows.export import CALIBRATION_IMAGES, preprocessed, spread

        ctx.extra["calibration"] = preprocessed(spread(scan_folder(args.data).train, CALIBRATION_IMAGES),
                                                model.spec.data_config)
        rows += variant_rows(ctx)
    try:
        measure(rows, args.repeats, len(labels))
    finally:
        for server in ctx.extra.get("servers", []):
            server.stop()
    q = report["int8"]
    print(f"{model.spec.architecture} @{model.spec.data_config['input_size'][-1]}px, {len(labels)} val images, "
          f"batch {args.batch_size}, {args.threads} threads; export check: fp32 max |dprob| "
          f"{report['fp32']['max_abs_prob_diff']:.2g}, int8 val acc {100 * q['val_acc_fp32']:.2f}% -> "
          f"{100 * q['val_acc_int8']:.2f}%")
    print_table(rows, labels, args.repeats)
    print(f"(bench total {time.perf_counter() - started:.0f} s)")
