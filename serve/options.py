"""The options of batch prediction, declared once (`PredictOptions`) for `finetune predict` and
`python -m serve.batch_predict`: the click options of both commands are generated from its fields.

Light on purpose (click and finetune.config only): the CLI imports it to build its commands, and building
`finetune --help` must not import torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import click

from finetune.config import FIXED_TTA_MODES

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")


def _opt(help: str, flag: str | None = None, short: str | None = None, type: Any = None, show: bool = False,
         **click_kwargs: Any) -> dict[str, Any]:
    """A field's command-line declaration: its help, the flag when it is not the field's name, a click type."""
    return {"help": help, "flag": flag, "short": short, "type": type, "show": show, "click": click_kwargs}


@dataclass(frozen=True)
class PredictOptions:
    """How batch prediction runs: every option but the model and the inputs."""

    output: str = field(default="", metadata=_opt(
        "Output file: .csv or .parquet (written when every image is done).", short="-o",
        type=click.Path(dir_okay=False), required=True))
    tta: str | None = field(default=None, metadata=_opt(
        "Test-time crops (default: the model's).", type=click.Choice(FIXED_TTA_MODES)))
    top_k: int = field(default=3, metadata=_opt(
        "How many top classes to write per image.", type=click.IntRange(min=1), show=True))
    batch_size: int = field(default=32, metadata=_opt(
        "Images per batch.", type=click.IntRange(min=1), show=True))
    num_workers: int | None = field(default=None, metadata=_opt(
        "Data loader workers (default: from the cores).", type=click.IntRange(min=0)))
    resume: bool = field(default=False, metadata=_opt(
        "Keep rows already in the output (or left by an interrupted run) and predict only the other images.",
        is_flag=True))
    max_pixels: int | None = field(default=None, metadata=_opt(
        "Refuse images with more pixels than this (default: the model's training limit).",
        flag="--max-image-pixels", type=click.IntRange(min=1)))
    accelerator: str = field(default="auto", metadata=_opt("auto, cpu or gpu.", show=True))
    devices: str | int = field(default="1", metadata=_opt(
        "Devices (processes with --strategy ddp).", show=True))
    strategy: str = field(default="auto", metadata=_opt(
        "ddp (with --devices N) shards the inputs over N processes (Lightning).", show=True))
    explain: str | None = field(default=None, metadata=_opt(
        "Also write each predicted image's Grad-CAM overlay (<stem>_cam.png) into this folder.",
        type=click.Path(file_okay=False)))
    reject_unknown: bool = field(default=False, metadata=_opt(
        "Write 'unknown' as the label of images the model flags unknown (default: keep the label).", is_flag=True))
    runtime_name: str | None = field(default=None, metadata=_opt(
        "torch, or ONNX Runtime (the ONNX version `finetune export --register` registers); default auto: ONNX "
        "Runtime when the model carries an ONNX graph.", flag="--runtime", type=click.Choice(RUNTIMES)))
    ood_threshold: float | None = field(default=None, metadata=_opt(
        "Unknown-score threshold (default: the model's, which keeps 95% of held-out training images).", type=float))
    progress: bool = True  # a progress bar (not an option: tests and library callers turn it off)

    def __post_init__(self) -> None:
        devices = self.devices
        if isinstance(devices, str) and devices.isdigit():
            object.__setattr__(self, "devices", int(devices))


def _click_option(f: dataclasses.Field) -> Any:
    meta = f.metadata
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    names = [flag, *([meta["short"]] if meta["short"] else []), f.name]
    kwargs = dict(meta["click"])
    if meta["type"] is not None:
        kwargs["type"] = meta["type"]
    if not kwargs.get("required") and not kwargs.get("is_flag") and f.default is not None:
        kwargs["default"] = f.default
    return click.option(*names, help=meta["help"], show_default=meta["show"], **kwargs)


def prediction_options(f):
    """Every field of `PredictOptions` that is a command-line option, as click options in declaration order."""
    for option in reversed([_click_option(o) for o in dataclasses.fields(PredictOptions) if o.metadata]):
        f = option(f)
    return f


def run_prediction(model_uri: str, inputs: Any, options: dict[str, Any]) -> None:
    """Predict with the parsed `prediction_options` and print the counts (on the first process only)."""
    from serve.batch_predict import predict

    result = predict(model_uri, inputs, PredictOptions(**options))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        click.echo(f"{result['predicted']} predicted, {result['already_done']} kept from before, "
                   f"{result['total']} rows in {result['output']}")
