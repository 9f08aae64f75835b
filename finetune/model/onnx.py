"""The trained network as an ONNX file, run by ONNX Runtime, checked against PyTorch, quantized to int8.

The graph is `finetune.model.outputs.LogitsAndFeatures` traced: input ``images`` ``[N, 3, H, W]`` float32
(normalised, exactly what the eval transform produces; dynamic batch axis), outputs ``logits`` ``[N, K]``
and ``features`` ``[N, C]``. Temperature scaling and the unknown-image score work on those two outputs
downstream, so the graph needs nothing else. The file describes itself: its metadata holds the model
spec (architecture, class names, preprocessing contract, default TTA mode) as JSON, and the sha256 of the
`model.safetensors` it was exported from: a model loading a graph checks both against its own folder
(`check_graph`), so a graph left by an export of another model is refused.

onnx and onnxruntime are an optional extra (``uv sync --extra onnx``); without it every entry point
here says so in one line.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from finetune import runtime
from finetune.errors import UserError
from finetune.files import replacing
from finetune.model.artifact import WEIGHTS_FILE, ModelSpec, build_network, weights_sha256
from finetune.model.outputs import LogitsAndFeatures

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "features")
DEFAULT_OPSET = 17  # ONNX Runtime, TensorRT and OpenVINO all read it
SPEC_KEY = "finetune.model_spec"  # metadata_props key of the ModelSpec JSON
WEIGHTS_KEY = "finetune.weights_sha256"  # metadata_props key: sha256 of the model.safetensors exported
# fp32 ONNX Runtime vs PyTorch differ by float summation order only: measured <= 4e-5 in logits on
# mobilenetv2_100 @224; 1e-3 in probability leaves room for deeper nets and still catches a wrong graph.
FP32_TOLERANCE = 1e-3
INSTALL_MESSAGE = ("ONNX Runtime is not installed (it is an optional extra): uv sync --extra onnx "
                   "(pip install 'finetune[onnx]').")


def require_onnxruntime():
    """The onnxruntime module, or a UserError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(INSTALL_MESSAGE) from None
    return onnxruntime


def require_onnx():
    """The onnx module, or a UserError naming the extra to install."""
    try:
        import onnx
    except ImportError:
        raise UserError(INSTALL_MESSAGE.replace("ONNX Runtime", "onnx")) from None
    return onnx


def _metadata(spec: ModelSpec, weights_digest: str | None = None) -> dict[str, str]:
    """What a consumer of the file needs besides the graph; plain keys for tools that show metadata."""
    digest = {WEIGHTS_KEY: weights_digest} if weights_digest else {}
    return {SPEC_KEY: json.dumps(asdict(spec), default=str), **digest,
            "class_names": json.dumps(list(spec.class_names)),
            "preprocessing": json.dumps(spec.data_config, default=str),
            "default_tta": spec.default_tta, "architecture": spec.architecture,
            "outputs": "logits [N, K] (softmax for probabilities), features [N, C] (the classifier's input)"}


def exportable_copy(net: nn.Module, spec: ModelSpec) -> nn.Module:
    """The same network and weights built with timm's export-friendly layers (CPU, eval mode).

    TF-style ``same`` padding (the shared MobileNets) is otherwise computed from the input shape at
    every call: a chain of Shape/Cast/Concat/Slice/Pad nodes per strided conv in the graph, which ONNX
    Runtime's int8 quantizer cannot handle ("Graph is not a DAG"). Exportable, the padding is fixed for
    the spec's input size, which the graph has anyway (only the batch axis is dynamic).
    """
    import importlib
    from unittest import mock

    from timm.layers import set_layer_config

    conv2d_same = importlib.import_module("timm.layers.conv2d_same")  # the module, not its same-named function

    # timm keeps its export conv (Conv2dSameExport: the padding fixed at the first call) behind a module
    # flag as well as the exportable config; both are set only while the copy is built.
    with set_layer_config(exportable=True), mock.patch.object(conv2d_same, "_USE_EXPORT_CONV", True):
        copy = build_network(spec)
    copy.load_state_dict({k: v.detach().cpu() for k, v in net.state_dict().items()})
    with torch.no_grad():  # outside the tracer, so the padding is fixed as plain numbers, not traced shape maths
        copy.eval()(torch.zeros(1, *[int(s) for s in spec.data_config["input_size"]]))
    return copy


def export_onnx(net: nn.Module, spec: ModelSpec, path: str | Path, opset: int = DEFAULT_OPSET,
                weights_digest: str | None = None) -> Path:
    """Trace ``LogitsAndFeatures(net)`` to `path` (dynamic batch, written atomically) with the spec and the sha256
    of the weights file `net` was loaded from (`weights_digest`) in its metadata."""
    onnx = require_onnx()
    path = Path(path)
    with replacing(path) as tmp:
        _trace(net, spec, tmp, opset)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, _metadata(spec, weights_digest))
        onnx.save(model, str(tmp))
    return path


def _trace(net: nn.Module, spec: ModelSpec, path: Path, opset: int) -> None:
    dummy = torch.zeros(2, *[int(s) for s in spec.data_config["input_size"]])
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, which needs onnxscript and
        # more time; this one traces every timm model we use (checked: resnet, vit, mobilenetv2).
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(LogitsAndFeatures(exportable_copy(net, spec)), (dummy,), str(path),
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic,
                              opset_version=opset, dynamo=False)
        except torch.onnx.OnnxExporterError as e:
            raise UserError(f"{spec.architecture} at input size {dummy.shape[-2:]} cannot be exported to ONNX "
                            f"opset {opset}: {str(e).splitlines()[0][:300]}") from None


def read_spec(path: str | Path) -> ModelSpec:
    """The ModelSpec an exported file carries in its metadata."""
    onnx = require_onnx()
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if SPEC_KEY not in props:
        raise UserError(f"{path} was not exported by finetune (no {SPEC_KEY} in its metadata).")
    return ModelSpec.from_dict(json.loads(props[SPEC_KEY]))


def check_graph(metadata: dict[str, str], model_dir: str | Path, spec: ModelSpec, name: str) -> None:
    """Refuse a graph (its metadata) exported from another model than the one in `model_dir`: other class names,
    or other weights than its `model.safetensors`. A graph exported before the weights were recorded can only be
    checked by its classes: a log line says so."""
    problems = []
    classes = json.loads(metadata.get("class_names") or "null")
    if classes != list(spec.class_names):
        problems.append(f"its classes {classes} are not the model's {list(spec.class_names)}")
    if WEIGHTS_KEY not in metadata:
        log.warning("%s records no weights digest (an export older than the check): only its classes were checked "
                    "against the model; export again to bind it to the weights.", name)
    elif metadata[WEIGHTS_KEY] != weights_sha256(model_dir):
        problems.append(f"it was exported from other weights than this model's {WEIGHTS_FILE}")
    if problems:
        raise UserError(f"{name} does not belong to this model: {'; '.join(problems)}. It is a stale graph (left by "
                        "an export of another model?): export this model again (finetune export MODEL_URI --format "
                        "onnx --register), or load it with runtime torch.")


class OnnxRunner:
    """An ONNX Runtime session over an exported file: ``runner(images) -> (logits, features)`` as torch
    tensors, a drop-in for ``LogitsAndFeatures(net)`` in prediction code.

    Args:
        threads: intra-op threads (ONNX Runtime's default, all cores, when None).
        device: "cpu", or "cuda" for ONNX Runtime's CUDA provider (an error when it has none).
    """

    returns_features = True  # prediction code calls it as it is (evaluation.tta.forward_views)

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "cpu"):
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("ONNX Runtime here has no CUDA provider: install onnxruntime-gpu, or run on the CPU.")
            providers.insert(0, "CUDAExecutionProvider")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
        logits, features = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images, np.float32)})
        return torch.from_numpy(logits), torch.from_numpy(features)


def _in_batches(fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(part) for part in images.split(batch_size)])


@torch.no_grad()
def compare(torch_net: nn.Module, runner: OnnxRunner, images: torch.Tensor, batch_size: int = 32) -> dict[str, Any]:
    """Label agreement and the largest probability / feature differences of a runner vs PyTorch."""
    with runtime.evaluating_on(torch_net, "cpu"):
        reference = LogitsAndFeatures(torch_net)
        ref_logits = _in_batches(lambda x: reference(x)[0], images, batch_size).float()
        ref_feats = _in_batches(lambda x: reference(x)[1], images, batch_size).float()
    logits = _in_batches(lambda x: runner(x)[0], images, batch_size)
    feats = _in_batches(lambda x: runner(x)[1], images, batch_size)
    same = ref_logits.argmax(1) == logits.argmax(1)
    return {"images": len(images), "labels_identical": bool(same.all()), "label_mismatches": int((~same).sum()),
            "max_abs_prob_diff": float((ref_logits.softmax(1) - logits.softmax(1)).abs().max()),
            "max_abs_logit_diff": float((ref_logits - logits).abs().max()),
            "max_abs_feature_diff": float((ref_feats - feats).abs().max())}


def verify(torch_net: nn.Module, runner: OnnxRunner, images: torch.Tensor,
           tolerance: float = FP32_TOLERANCE) -> dict[str, Any]:
    """The export's check: identical labels and max |Δprob| <= `tolerance` on `images`, else a UserError."""
    if len(images) == 0:
        raise UserError("No images to verify the export on.")
    report = {**compare(torch_net, runner, images), "tolerance": tolerance}
    report["passed"] = report["labels_identical"] and report["max_abs_prob_diff"] <= tolerance
    if not report["passed"]:
        raise UserError(f"The ONNX export of {runner.path.name} does not match PyTorch on {report['images']} images: "
                        f"{report['label_mismatches']} label(s) differ, max |Δprob| {report['max_abs_prob_diff']:.3g} "
                        f"(tolerance {tolerance:g}). The export is refused.")
    return report


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over preprocessed image batches."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch.float().cpu().numpy()}

    def rewind(self) -> None:  # one pass is all quantize_static makes with MinMax calibration
        raise NotImplementedError


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration_images: torch.Tensor,
                  batch_size: int = 16, per_channel: bool = True, quant_format: str = "QOperator") -> Path:
    """Static int8 quantization (ONNX Runtime, MinMax) calibrated on preprocessed images ``[N, 3, H, W]``.

    Per-channel weights: per-tensor lost 25 accuracy points on hymenoptera val with mobilenetv2_100
    (depthwise convs' channels differ too much for one scale), per-channel none. QOperator
    (QLinearConv) and QDQ ran within noise of each other on this CPU, QOperator ahead in three runs
    (`bench/deploy.py --variants`, docs/decisions.md). TensorRT and OpenVINO calibrate the fp32 file themselves.
    """
    require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_images) == 0:
        raise UserError("No calibration images for int8 quantization.")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp, replacing(out_path) as target:
        prepared = Path(tmp) / "prepared.onnx"  # shapes inferred and BatchNorm folded, as ORT advises
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), _Calibration(calibration_images.split(batch_size)),
                        quant_format=QuantFormat[quant_format], per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        # ranges merged every 4 batches rather than every activation of every image kept to
                        # the end (200 images of mobilenetv2 @224: peak 2.8 GB instead of 3.0; more with more)
                        extra_options={"CalibMaxIntermediateOutputs": 4})
        _copy_metadata(fp32_path, target)
    return out_path


def _copy_metadata(source: str | Path, target: Path) -> None:
    onnx = require_onnx()
    props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    model = onnx.load(str(target))
    onnx.helper.set_model_props(model, {**props, "quantization": "int8 static (ONNX Runtime)"})
    onnx.save(model, str(target))


# --- which runtime a loaded model predicts with ------------------------------------------------------

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
RUNTIME_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}


def choose_runtime(requested: str | None, model_dir: str | Path, device: str = "cpu") -> str:
    """The runtime a model loaded from `model_dir` predicts with on `device` ("cpu" or "cuda"): `requested`, or
    with "auto" (the default) ONNX Runtime when the model carries an ONNX graph (`finetune export --register`)
    and it is installed (on a GPU: with its CUDA provider), else torch, on a GPU in training's precision (a
    log line says why when a graph is there)."""
    requested = (requested or "auto").strip().lower()
    if requested not in RUNTIMES:
        raise UserError(f"Invalid runtime {requested!r}. Valid values: {', '.join(RUNTIMES)}.")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if not (Path(model_dir) / RUNTIME_FILES["onnx"]).exists():
            return "torch"
        try:
            ort = require_onnxruntime()
        except UserError as e:
            log.warning("This model has an ONNX graph, but it runs on torch: %s", e)
            return "torch"
        if str(device).startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
            log.info("This model has an ONNX graph, but ONNX Runtime here has no CUDA provider (onnxruntime-gpu): "
                     "it runs on torch on the GPU, in training's precision.")
            return "torch"
        return "onnx"
    if not (Path(model_dir) / RUNTIME_FILES[requested]).exists():
        raise UserError(f"This model has no {RUNTIME_FILES[requested]}: export it (finetune export MODEL_URI "
                        f"--format onnx{' --quantize int8' if requested == 'onnx-int8' else ''} --register) and "
                        "load the ONNX version it registers, or use --runtime torch.")
    require_onnxruntime()
    return requested
