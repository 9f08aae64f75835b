"""`finetune export MODEL_URI --format onnx [--quantize int8] [--register]`: a trained model as ONNX files.

Each file is checked on real images before it is accepted: the fp32 export against PyTorch (identical
labels, max |Δprob| within the tolerance, else the export is refused with an error), the int8 one by
its val accuracy against the fp32 export (more than `max_loss` points lost: it is neither logged nor
registered, and the result says so). Accepted files go to the model's own MLflow run under `onnx/`,
and with `register` they are tagged on its registered version (`onnx`, `onnx_int8`), so the registry
keeps one entry per trained model with all its formats.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
import shutil
from pathlib import Path
import tempfile
import time
from typing import Any, Sequence

import torch

from finetune import runtime, tracking
from finetune.data.crops import CropViews, ViewsDataset
from finetune.data.folders import FolderSplits, Sample, scan_folder
from finetune.errors import UserError
from finetune.evaluation.tta import predict_sources
from finetune.files import copy_file
from finetune.model.artifact import ModelSpec, weights_sha256
from finetune.model import onnx as onnx_export
from finetune.workflows.resume import DATA_TAG

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"  # artifact folder in the model's run
FP32_FILE, INT8_FILE, REPORT_FILE = "model.onnx", "model.int8.onnx", "export.json"
ONNX_MODEL_NAME = "model_onnx"  # the ONNX pyfunc model in the trained model's run
VERIFY_IMAGES = 64  # val images the fp32 export is compared on
CALIBRATION_IMAGES = 200  # training images int8 is calibrated on
DEFAULT_MAX_LOSS = 1.0  # val accuracy points int8 may lose against fp32


@dataclass
class ExportOptions:
    fmt: str = "onnx"
    quantize: str | None = None  # "int8"
    # Register the ONNX model under this name; "" (a bare --register): the registered model of the source's
    # version. None: not registered.
    register: str | None = None
    data_dir: str | None = None  # default: the training run's data folder
    output: str | None = None
    max_loss: float = DEFAULT_MAX_LOSS
    tolerance: float = onnx_export.FP32_TOLERANCE
    batch_size: int = 32


def spread(samples: Sequence[Sample], limit: int) -> list[Sample]:
    """At most `limit` samples evenly spaced over the list (which is ordered by class), so all classes show."""
    if len(samples) <= limit:
        return list(samples)
    return [samples[int(i * len(samples) / limit)] for i in range(limit)]


def preprocessed(samples: Sequence[Sample], data_config: dict[str, Any]) -> torch.Tensor:
    """The eval transform's tensors ``[N, 3, H, W]`` of the readable images among `samples`."""
    ds = ViewsDataset([s.path for s in samples], CropViews(data_config, "center"), data_config)
    views = [v for v, _, err in (ds[i] for i in range(len(ds))) if not err]
    if not views:
        raise UserError("None of the images picked to check the export could be read.")
    return torch.cat(views)


def training_data(run, data_dir: str | None, spec: ModelSpec) -> tuple[FolderSplits, list[int]]:
    """The splits of the training run's folder (or `data_dir`) and the map of its classes to the model's."""
    folder = data_dir or run.data.tags.get(DATA_TAG)
    if not data_dir and (not folder or not Path(folder).exists()):  # a given --data is scan_folder's to check
        # (the run's data: a folder, or a label file)
        where = f"the training run's data {folder} is not here" if folder else "the run records no data folder"
        raise UserError(f"The export is checked on real images, but {where}: pass --data DIR (a labelled image "
                        "folder of the model's classes).")
    params = run.data.params  # the run's own split, so val images are ones the model did not train on
    splits = scan_folder(folder, float(params.get("config.val_fraction", 0.2)), int(params.get("config.seed", 0)),
                         multi_label=spec.thresholds is not None)
    unknown = sorted(set(splits.classes) - set(spec.class_names))
    if unknown:
        raise UserError(f"Class folder(s) {unknown} in {folder} are not classes of the model "
                        f"({', '.join(spec.class_names)}). Pass --data with a folder of the model's classes.")
    return splits, [spec.class_names.index(c) for c in splits.classes]


def model_source(model_uri: str) -> tuple[str, Any]:
    """The run that logged the model, and its registered version (None when it has none)."""
    import mlflow

    c = tracking.client()
    try:
        run_id = mlflow.models.get_model_info(model_uri).run_id
    except Exception as e:
        raise UserError(f"Cannot read model {model_uri!r}: {str(e).splitlines()[0][:300]}.") from None
    ref = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    if "@" in ref:  # models:/NAME@ALIAS
        return run_id, c.get_model_version_by_alias(*ref.split("@", 1))
    if "/" in ref:  # models:/NAME/VERSION
        return run_id, c.get_model_version(*ref.split("/", 1))
    # runs:/ID/model or a logged model's models:/m-ID: the newest version registered from its run
    versions = c.search_model_versions(f"run_id = '{run_id}'")
    return run_id, max(versions, key=lambda v: int(v.version), default=None)


def val_accuracy(runner: onnx_export.OnnxRunner, samples: Sequence[Sample], label_map: list[int],
                 spec: ModelSpec, batch_size: int) -> tuple[float, torch.Tensor]:
    """Accuracy (0-1, centre crop) of a runner on `samples`, and its predicted labels (-1: unreadable)."""
    probs, errors = predict_sources(runner, [s.path for s in samples], spec.data_config,
                                    "center", batch_size=batch_size)
    pred = torch.where(torch.tensor([bool(e) for e in errors]), -1, probs.nan_to_num(0).argmax(1))
    truth = torch.tensor([label_map[s.label] for s in samples])
    ok = pred >= 0
    return float((pred[ok] == truth[ok]).float().mean()) if ok.any() else float("nan"), pred


def int8_check(fp32: Path, splits: FolderSplits, label_map: list[int], spec: ModelSpec,
               options: ExportOptions, out: Path) -> dict[str, Any]:
    """Quantize on training images; compare val accuracy with the fp32 export; accept or refuse."""
    calibration = preprocessed(spread(splits.train, CALIBRATION_IMAGES), spec.data_config)
    int8 = onnx_export.quantize_int8(fp32, out / INT8_FILE, calibration)
    val = splits.val or splits.test
    if not val:
        raise UserError("int8 is judged by its accuracy on val, but the data folder has no val images.")
    acc32, pred32 = val_accuracy(onnx_export.OnnxRunner(fp32), val, label_map, spec, options.batch_size)
    acc8, pred8 = val_accuracy(onnx_export.OnnxRunner(int8), val, label_map, spec, options.batch_size)
    loss = 100 * (acc32 - acc8)
    report = {"calibration_images": len(calibration), "val_images": len(val), "tta": "center",
              "val_acc_fp32": acc32, "val_acc_int8": acc8, "accuracy_loss_points": loss,
              "label_agreement": float((pred32 == pred8).float().mean()), "max_loss_points": options.max_loss,
              "accepted": bool(loss <= options.max_loss)}
    if not report["accepted"]:
        report["refused"] = (f"int8 refused: it loses {loss:.2f} accuracy points on val ({100 * acc32:.2f}% -> "
                             f"{100 * acc8:.2f}%), more than --max-loss {options.max_loss:g}; not logged or registered.")
        log.warning(report["refused"])
    return report


def tag_version(model_version, artifacts: dict[str, str]) -> None:
    """Tag the version with each accepted file; a format refused now loses the tag an earlier export set."""
    c = tracking.client()
    for key in ("onnx", "onnx_int8"):
        if key in artifacts:
            c.set_model_version_tag(model_version.name, model_version.version, key, artifacts[key])
        elif key in (model_version.tags or {}):
            c.delete_model_version_tag(model_version.name, model_version.version, key)


def log_onnx_model(model: Any, run_id: str, out: Path, files: dict[str, str]) -> str:
    """The same pyfunc model with the accepted ONNX files beside its weights, logged as `model_onnx` in the run:
    loaded, it predicts with ONNX Runtime (`runtime` "auto"); returns its model URI."""
    from finetune.tracking import registry

    model_dir = out / "model"  # `out` is this export's own (output_folder): nothing of another export is in it
    # The loaded model's files but its graphs (an ONNX version exported again): only this export's go with it.
    shutil.copytree(model.model_dir, model_dir, copy_function=copy_file,
                    ignore=shutil.ignore_patterns(*onnx_export.RUNTIME_FILES.values()))
    for name in files.values():
        copy_file(out / name, model_dir / name)
    return registry.log_pyfunc(run_id, model_dir, model.class_names, model.default_tta, model.plan,
                               model.max_pixels, name=ONNX_MODEL_NAME, extra_requirements=("onnxruntime",))


def register_onnx_model(model_uri: str, name: str, source) -> dict[str, str]:
    """The ONNX pyfunc model as a version of registered model `name`. When the trained model has a registered
    version (`source`, of that name), the two are linked both ways by tags (`source_version` on it,
    `onnx_version` on the trained model's version); aliases stay where they are."""
    from finetune.tracking import registry

    if source is None:  # a model registered nowhere yet: its ONNX version is the first of `name`
        return {"name": name, "version": registry.register(model_uri, name, {"format": "onnx"}, aliases=False)}
    tags = {**(source.tags or {}), "format": "onnx", "source_version": str(source.version)}
    version_ = registry.register(model_uri, name, tags, aliases=False)
    tracking.client().set_model_version_tag(source.name, source.version, "onnx_version", version_)
    return {"name": name, "version": version_}


def registered_name(model_uri: str, register: str, model_version) -> str:
    """The registered model the ONNX version goes to: the source's (a bare --register), or NAME."""
    if model_version is None and not register:
        raise UserError(f"{model_uri} has no registered version to tag: register it (finetune train --register "
                        "NAME), pass models:/NAME@ALIAS, or name the registered model: --register NAME.")
    if model_version is not None and register and register != model_version.name:
        raise UserError(f"{model_uri} is registered as {model_version.name!r}: its ONNX version joins it, linked by "
                        f"tags. Use --register {model_version.name} (or a bare --register).")
    return register or model_version.name


def check_options(options: ExportOptions) -> None:
    if options.fmt != "onnx":
        raise UserError(f"Invalid format {options.fmt!r}. Valid values: onnx.")
    if options.quantize not in (None, "int8"):
        raise UserError(f"Invalid quantization {options.quantize!r}. Valid values: int8.")
    onnx_export.require_onnxruntime()
    onnx_export.require_onnx()


def output_folder(output: str | None) -> Path:
    """This export's folder: `output` when it is new or empty, else a UserError; by default a new one under
    outputs/. An export owns its folder, so that no file of an earlier export (another model's int8 graph, say)
    is logged with this one."""
    if output is None:
        Path("outputs").mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"export-{time.strftime('%Y%m%d-%H%M%S')}-", dir="outputs"))
    folder = Path(output)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--output {output} is not empty: an export writes into a folder of its own, so that no file "
                        "of an earlier export is logged with it. Pass a new or empty folder, or leave --output out "
                        "(a new folder under outputs/).")
    return folder


def export_model(model_uri: str, options: ExportOptions) -> dict[str, Any]:
    """`finetune export`: export, check, log to the model's run and (optionally) tag its registered version."""
    from finetune.tracking.pyfunc import load_logged_model

    check_options(options)
    out = output_folder(options.output) / ONNX_DIR
    runtime.configure()
    model = load_logged_model(model_uri)
    if model.spec.thresholds is not None and options.quantize == "int8":
        raise UserError("int8 is judged by the accuracy of one label per image; this model answers with several. "
                        "Export it without --quantize int8.")
    run_id, model_version = model_source(model_uri)
    register_as = None if options.register is None else registered_name(model_uri, options.register, model_version)
    splits, label_map = training_data(tracking.client().get_run(run_id), options.data_dir, model.spec)
    fp32 = onnx_export.export_onnx(model.net, model.spec, out / FP32_FILE,
                                   weights_digest=weights_sha256(model.model_dir))
    images = preprocessed(spread(splits.val or splits.train, VERIFY_IMAGES), model.spec.data_config)
    report: dict[str, Any] = {"model_uri": model_uri, "run_id": run_id, "files": {"onnx": FP32_FILE},
                              "fp32": onnx_export.verify(model.net, onnx_export.OnnxRunner(fp32), images,
                                                         options.tolerance)}
    if options.quantize == "int8":
        report["int8"] = int8_check(fp32, splits, label_map, model.spec, options, out)
        if report["int8"]["accepted"]:
            report["files"]["onnx_int8"] = INT8_FILE
    tracking.write_json(out / REPORT_FILE, report)
    for name in [*report["files"].values(), REPORT_FILE]:
        tracking.log_artifact(run_id, out / name, ONNX_DIR)
    report["artifacts"] = {key: f"runs:/{run_id}/{ONNX_DIR}/{name}" for key, name in report["files"].items()}
    report["model_uri_onnx"] = log_onnx_model(model, run_id, out, report["files"])
    if register_as is not None:
        if model_version is not None:
            tag_version(model_version, report["artifacts"])
            report["registered_model"] = {"name": model_version.name, "version": str(model_version.version)}
        report["registered_onnx"] = register_onnx_model(report["model_uri_onnx"], register_as, model_version)
    report["output"] = str(out.resolve())
    return report
