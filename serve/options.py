"""The options of batch prediction, declared once for `finetune predict` and `python -m serve.batch_predict`.

Light on purpose (click and finetune.config only): the CLI imports it to build its commands, and building
`finetune --help` must not import torch.
"""

from __future__ import annotations

from typing import Any

import click

from finetune.config import FIXED_TTA_MODES

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")


def prediction_options(f):
    """Every option of batch prediction but the model and the inputs, which the two commands take differently."""
    options = [
        click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
                     help="Output file: .csv or .parquet (written when every image is done)."),
        click.option("--tta", type=click.Choice(FIXED_TTA_MODES), help="Test-time crops (default: the model's)."),
        click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1),
                     help="How many top classes to write per image."),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
                     help="Images per batch."),
        click.option("--num-workers", type=click.IntRange(min=0), help="Data loader workers (default: from the cores)."),
        click.option("--resume", is_flag=True, help="Keep rows already in the output (or left by an interrupted "
                     "run) and predict only the other images."),
        click.option("--max-image-pixels", type=click.IntRange(min=1), help="Refuse images with more pixels than this."),
        click.option("--accelerator", default="auto", show_default=True, help="auto, cpu or gpu."),
        click.option("--devices", default="1", show_default=True, help="Devices (processes with --strategy ddp)."),
        click.option("--strategy", default="auto", show_default=True,
                     help="ddp (with --devices N) shards the inputs over N processes (Lightning)."),
        click.option("--explain", type=click.Path(file_okay=False),
                     help="Also write each predicted image's Grad-CAM overlay (<stem>_cam.png) into this folder."),
        click.option("--reject-unknown", is_flag=True,
                     help="Write 'unknown' as the label of images the model flags unknown (default: keep the label)."),
        click.option("--runtime", "runtime_name", type=click.Choice(RUNTIMES),
                     help="torch, or ONNX Runtime (the ONNX version `finetune export --register` registers); default "
                          "auto: ONNX Runtime when the model carries an ONNX graph."),
        click.option("--ood-threshold", type=float, help="Unknown-score threshold (default: the model's, which "
                     "keeps 95% of held-out training images)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def run_prediction(model_uri: str, inputs: Any, options: dict[str, Any]) -> None:
    """Predict with the parsed `prediction_options` and print the counts (on the first process only)."""
    import os

    from serve.batch_predict import predict_to_file

    devices = options["devices"]
    result = predict_to_file(model_uri, inputs, options["output"], options["tta"], options["top_k"],
                             options["batch_size"], options["num_workers"], options["resume"],
                             options["accelerator"], int(devices) if devices.isdigit() else devices,
                             options["strategy"], options["max_image_pixels"], explain=options["explain"],
                             ood_threshold=options["ood_threshold"], reject_unknown=options["reject_unknown"],
                             runtime_name=options["runtime_name"])
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        click.echo(f"{result['predicted']} predicted, {result['already_done']} kept from before, "
                   f"{result['total']} rows in {result['output']}")
