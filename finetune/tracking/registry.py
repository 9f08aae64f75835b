"""Logging the pyfunc model with a training run, registering it, and moving the `champion` alias.

A registered version gets alias `candidate`; `champion` is set only when the model has none yet,
and moved later on purpose with `finetune promote NAME VERSION`. Version tags say where the
version came from (dataset profile, scenario, metrics, training run).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from packaging.version import Version

from finetune import tracking
from finetune.errors import UserError
from finetune.data.images import DEFAULT_MAX_PIXELS
from finetune.model.artifact import SPEC_FILE
from finetune.tracking.pyfunc import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS, DEFAULT_TOP_K, MODEL_CODE,
                                      MODEL_DIR_ARTIFACT, example_image_bytes, format_predictions)

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "model"
CANDIDATE, CHAMPION = "candidate", "champion"
_REQUIREMENTS = ("torch", "torchvision", "timm", "mlflow", "pillow", "safetensors", "pandas", "numpy")


def signature(class_names: list[str], default_tta: str, multi_label: bool = False) -> ModelSignature:
    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)])
    example_out = format_predictions(torch.full((1, len(class_names)), 1.0 / len(class_names)),
                                     class_names, min(DEFAULT_TOP_K, len(class_names)),
                                     label_sets=[[0]] if multi_label else None)
    outputs = infer_signature(model_output=example_out).outputs
    # None: the model's own setting (its load-time model_config, or what training set).
    params = ParamSchema([ParamSpec("tta", "string", default_tta), ParamSpec("top_k", "long", DEFAULT_TOP_K),
                          ParamSpec("ood_threshold", "double", None), ParamSpec("reject_unknown", "boolean", None)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _pip_requirements(names: tuple[str, ...] = _REQUIREMENTS) -> list[str]:
    """Pinned from this environment, as MLflow pins: the public version, without a local label
    (`torch==2.5.1`, not `2.5.1+cpu`, which no package index serves). Without pins MLflow's
    inference would import and run the model (slow)."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={Version(version(name)).public}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc(run_id: str, model_dir: str | Path, class_names: list[str], default_tta: str,
               plan: dict[str, Any] | None, max_image_pixels: int | None = None, name: str = MODEL_NAME_IN_RUN,
               extra_requirements: tuple[str, ...] = ()) -> str:
    """Log the model as `name` (default `model`) in the run; returns its model URI."""
    tracking.client()
    # MLflow lets load-time model_config override only keys logged here, so every setting is present; the
    # request limits are logged with their values, so the MLmodel states them.
    # The training run's pixel limit: batch prediction, evaluation and export read the images training could;
    # a REST request is held to at most SERVING_MAX_PIXELS on top (pyfunc `request_max_pixels`).
    pixels = int(max_image_pixels or DEFAULT_MAX_PIXELS)
    config = {"default_tta": default_tta, "plan": plan or {}, "path_root": "", "max_image_pixels": pixels,
              "max_request_rows": DEFAULT_MAX_ROWS, "max_request_bytes": DEFAULT_MAX_BYTES,
              "batch_size": DEFAULT_BATCH_SIZE, "ood_threshold": "", "reject_unknown": False, "runtime": "auto"}
    example = pd.DataFrame({"image": [example_image_bytes()]})
    multi_label = json.loads((Path(model_dir) / SPEC_FILE).read_text()).get("thresholds") is not None
    # A second model in a run (the ONNX export's) has the same model_config, whose keys MLflow tries to log as
    # params again and warns it cannot; the first model's params are the run's.
    quiet = logging.getLogger("mlflow.models.model")
    level = quiet.level
    if name != MODEL_NAME_IN_RUN:
        quiet.setLevel(logging.ERROR)
    with mlflow.start_run(run_id=run_id), contextlib.ExitStack() as restore:
        restore.callback(quiet.setLevel, level)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=MODEL_CODE, artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
            model_config=config, signature=signature(class_names, default_tta, multi_label), input_example=example,
            pip_requirements=_pip_requirements(_REQUIREMENTS + tuple(extra_requirements)))
    return info.model_uri


def version_tags(summary: dict[str, Any]) -> dict[str, str]:
    tags = {"training_run_id": summary["mlflow_run_id"], "scenario": str(summary.get("scenario", "")),
            "dataset_profile": json.dumps(summary.get("profile") or summary.get("data") or {}, default=str)[:5000]}
    tags.update({f"metric.{k}": f"{v:.6g}" if isinstance(v, float) else str(v)
                 for k, v in summary.get("metrics", {}).items()})
    return tags


def register(model_uri: str, name: str, tags: dict[str, str], aliases: bool = True) -> str:
    """Register a version and tag it; alias it `candidate` (and `champion` when there is none) unless `aliases`
    is False (a linked version, e.g. a model's ONNX export)."""
    c = tracking.client()
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints its own "Successfully registered" lines
        mv = mlflow.register_model(model_uri, name, tags=tags)
    if not aliases:
        log.info("Registered %s version %s", name, mv.version)
        return str(mv.version)
    # Two runs registering at once must not both see "no champion" and both set it, nor leave `candidate` on the
    # older of their versions: each check and its set are one step under the store's lock.
    with tracking.store_lock("registry"):
        aliases = c.get_registered_model(name).aliases
        if int(aliases.get(CANDIDATE, 0)) < int(mv.version):
            c.set_registered_model_alias(name, CANDIDATE, mv.version)
        first = CHAMPION not in aliases
        if first:
            c.set_registered_model_alias(name, CHAMPION, mv.version)
    if first:
        log.info("Registered %s version %s as %s and %s", name, mv.version, CANDIDATE, CHAMPION)
    else:
        log.info("Registered %s version %s as %s (champion unchanged)", name, mv.version, CANDIDATE)
    return str(mv.version)


def publish(run_id: str, model_dir: str | Path, summary: dict[str, Any], default_tta: str,
            register_as: str | None, max_image_pixels: int | None = None) -> dict[str, Any]:
    """After training: log the pyfunc model; register it when asked. Returns keys for summary.json."""
    uri = log_pyfunc(run_id, model_dir, summary["classes"], default_tta, summary.get("plan"), max_image_pixels)
    out: dict[str, Any] = {"model_uri": uri}
    if register_as:
        version_ = register(uri, register_as, version_tags({**summary, "mlflow_run_id": run_id}))
        out["registered_model"] = {"name": register_as, "version": version_}
    return out


def promote(name: str, version_: str) -> None:
    """Move `champion` to a version; unknown names or versions are a UserError."""
    c = tracking.client()
    try:
        c.get_model_version(name, str(version_))
    except MlflowException:
        try:
            versions = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            versions = []
        hint = f"Versions: {', '.join(map(str, versions))}." if versions else "No such registered model."
        raise UserError(f"Model {name!r} has no version {version_}. {hint}") from None
    c.set_registered_model_alias(name, CHAMPION, str(version_))
