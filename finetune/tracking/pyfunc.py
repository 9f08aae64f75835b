"""The MLflow pyfunc model: image bytes (or allowed paths) in, label + probabilities out.

Logged as *models-from-code* (`finetune/tracking/model_code.py` is the model's code), so nothing live is
pickled: the model carries `model.safetensors` + `model.json` (architecture, data config, class
names) as artifacts, and its `model_config` carries the default TTA mode, the plan and the pixel
limit. `load_context` rebuilds the network through `finetune.model.artifact.load_model`.

Load-time settings (`mlflow.pyfunc.load_model(uri, model_config={...})`, or environment variables
for `mlflow models serve`):

* ``path_root`` / ``FINETUNE_PATH_ROOT``: the only folder a request's `path` column may read from.
  Unset: `path` is refused, so a server never reads arbitrary files.
* ``max_image_pixels`` / ``FINETUNE_MAX_IMAGE_PIXELS``: larger images are refused before decoding.
* ``runtime`` / ``FINETUNE_RUNTIME``: ``auto`` (default: ONNX Runtime when the model carries an ONNX graph,
  from `finetune export --register`, and ONNX Runtime is installed; else torch), ``torch``, ``onnx`` or
  ``onnx-int8`` (an error naming what is missing when the graph or ONNX Runtime is not there).
* ``ood_threshold``: the unknown score above which an image is ``unknown`` (default: the model's own,
  set on held-out training images so that 95% of in-distribution images are kept).
* ``reject_unknown``: replace the label of an unknown image by ``unknown`` (default false: the label is
  kept and the ``unknown`` column says so).

Per request, ``params`` may override ``tta``, ``top_k``, ``ood_threshold`` and ``reject_unknown``.
Every output has ``ood_score`` (higher: less like the training images) and ``unknown`` beside ``label``
and ``score``; scores are calibrated (the model's temperature, `finetune.model.scoring`).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from finetune import runtime
from finetune.model.artifact import load_model, load_scoring
from finetune.model.onnx import RUNTIME_FILES, OnnxRunner, choose_runtime
from finetune.model.scoring import UNKNOWN_LABEL
from finetune.data.images import DEFAULT_MAX_PIXELS
from finetune.data.crops import TTA_VIEWS, CropViews, ViewsDataset
from finetune.evaluation.tta import score_views

log = logging.getLogger(__name__)

MODEL_DIR_ARTIFACT = "model_dir"
DEFAULT_TOP_K = 3
DEFAULT_BATCH_SIZE = 32  # images per forward pass (model_config "batch_size")


class BadRequest(MlflowException):
    """A request the client must fix; the scoring server answers it with HTTP 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def resolve_allowed_path(path: str, root: str | None) -> str:
    """The real path of `path` if it lies under `root` (symlinks resolved), else BadRequest."""
    if not root:
        raise BadRequest("The 'path' column is disabled on this model: send the file's bytes in the 'image' "
                         "column, or load the model with path_root (FINETUNE_PATH_ROOT) set.")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real, real_root]) != real_root:
        raise BadRequest(f"path {path!r} is outside the allowed root; only files under the configured "
                         "path_root can be read.")
    return real


def _as_bytes(value: Any) -> bytes | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # base64 text that no schema decoded for us
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("The 'image' column must hold image bytes (base64-encoded in JSON).") from None
    raise BadRequest(f"The 'image' column must hold image bytes, not {type(value).__name__}.")


class ImageClassifierModel(PythonModel):
    """pyfunc wrapper around a trained network; see the module docstring for settings."""

    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        self.runtime = runtime.resolve()  # this process's GPU when it has one, with training's precision
        self.model_dir = context.artifacts[MODEL_DIR_ARTIFACT]
        self.net, self.spec = load_model(self.model_dir, self.runtime.device)
        # Once, here: every request's forward pass runs the weights in this layout (runtime.evaluating_on), and
        # converting them per request cost about 3 ms of a 26 ms single-image request (mobilenetv2, 1 thread).
        self.net.to(memory_format=torch.channels_last)
        self.scoring = load_scoring(self.model_dir, self.spec)
        requested = config.get("runtime")
        if requested in (None, "", "auto"):  # the logged default: a server's environment may choose
            requested = os.environ.get("FINETUNE_RUNTIME") or "auto"
        self.runtime_name = choose_runtime(requested, self.model_dir, self.runtime.device.type)
        self.runner = None
        if self.runtime_name != "torch":  # the exported graph: same preprocessing, logits and features
            self.runner = OnnxRunner(Path(self.model_dir) / RUNTIME_FILES[self.runtime_name],
                                     threads=torch.get_num_threads(), device=self.runtime.device.type)
        self.ood_threshold = _optional_float(config.get("ood_threshold"), "ood_threshold")
        self.reject_unknown = _flag(config.get("reject_unknown", False), "reject_unknown")
        self.batch_size = int(config.get("batch_size") or DEFAULT_BATCH_SIZE)
        self.default_tta = config.get("default_tta") or self.spec.default_tta or "center"
        self.plan = config.get("plan")
        self.path_root = config.get("path_root") or os.environ.get("FINETUNE_PATH_ROOT") or None
        self.max_pixels = int(os.environ.get("FINETUNE_MAX_IMAGE_PIXELS") or config.get("max_image_pixels")
                              or DEFAULT_MAX_PIXELS)

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    def _params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        params = params or {}
        tta = params.get("tta") or self.default_tta
        if tta not in TTA_VIEWS:
            raise BadRequest(f"Invalid tta {tta!r}. Valid values: {', '.join(TTA_VIEWS)}.")
        try:
            top_k = int(params.get("top_k") or DEFAULT_TOP_K)
        except (TypeError, ValueError):
            raise BadRequest(f"top_k must be an integer, not {params.get('top_k')!r}.") from None
        if top_k < 1:
            raise BadRequest(f"top_k must be at least 1 (got {top_k}).")
        threshold = _optional_float(params.get("ood_threshold"), "ood_threshold")
        reject = params.get("reject_unknown")
        return {"tta": tta, "top_k": min(top_k, len(self.class_names)),
                "threshold": self.ood_threshold if threshold is None else threshold,
                "reject": self.reject_unknown if reject is None else _flag(reject, "reject_unknown")}

    def _sources(self, frame: pd.DataFrame) -> list[bytes | str]:
        if "image" not in frame.columns and "path" not in frame.columns:
            raise BadRequest(f"The input needs an 'image' column (image bytes, base64 in JSON) or a 'path' "
                             f"column; got columns {list(frame.columns)}.")
        images = frame["image"] if "image" in frame.columns else [None] * len(frame)
        paths = frame["path"] if "path" in frame.columns else [None] * len(frame)
        sources: list[bytes | str] = []
        for row, (image, path) in enumerate(zip(images, paths)):
            data = _as_bytes(image)
            if data is not None:
                sources.append(data)
            elif isinstance(path, str) and path:
                sources.append(resolve_allowed_path(path, self.path_root))
            else:
                raise BadRequest(f"Row {row} has neither image bytes nor a path.")
        return sources

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        options = self._params(params)
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        sources = self._sources(model_input)
        probs, ood = self.predict_scores(sources, options["tta"])
        unknown = self.scoring.unknown(ood, options["threshold"])
        return format_predictions(probs, self.class_names, options["top_k"], ood, unknown, options["reject"])

    def predict_scores(self, sources: list[bytes | str], tta: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated probabilities ``[N, K]`` and unknown scores ``[N]``; an unusable image fails the request."""
        ds = ViewsDataset(sources, CropViews(self.spec.data_config, tta), self.spec.data_config, self.max_pixels)
        items = [ds[i] for i in range(len(ds))]
        bad = [f"row {i}: {err}" for _, i, err in items if err]
        if bad:
            raise BadRequest("Unusable image(s): " + "; ".join(bad[:10]))
        if not items:
            return torch.empty(0, len(self.class_names)), torch.empty(0)
        views = torch.stack([v for v, _, _ in items])
        # A request can hold any number of images: forward them batch_size at a time (bounded memory).
        with torch.no_grad(), self.runtime.autocast():
            parts = [score_views(self.predictor, chunk.to(self.runtime.device), self.scoring)
                     for chunk in views.split(self.batch_size)]
        return torch.cat([p.float().cpu() for p, _ in parts]), torch.cat([o.float().cpu() for _, o in parts])

    @property
    def predictor(self) -> Any:
        """What the images go through: the ONNX Runtime session when the model runs on ONNX, else the network."""
        return self.runner if self.runner is not None else self.net

    @property
    def device(self) -> torch.device:
        return self.runtime.device


def load_logged_model(model_uri: str, model_config: dict[str, Any] | None = None) -> "ImageClassifierModel":
    """The finetune model behind a logged or registered MLflow model URI; a UserError when there is none."""
    import mlflow

    from finetune import tracking
    from finetune.errors import UserError

    tracking.client()
    try:
        return mlflow.pyfunc.load_model(model_uri, model_config=model_config or None).unwrap_python_model()
    except UserError:
        raise
    except Exception as e:  # unknown run, name, alias or version
        raise UserError(f"Cannot load model {model_uri!r}: {str(e).splitlines()[0][:300]}. Use runs:/RUN_ID/model "
                        "or models:/NAME@ALIAS (or models:/NAME/VERSION).") from None


COLUMNS = ["label", "score", "top_labels", "top_scores", "probabilities", "ood_score", "unknown"]


def format_predictions(probs: torch.Tensor, class_names: list[str], top_k: int, ood: torch.Tensor | None = None,
                       unknown: torch.Tensor | None = None, reject_unknown: bool = False) -> pd.DataFrame:
    """One row per image: label, score, the top-k labels/scores, every class probability, the unknown score
    (NaN for a model without one) and whether the image is unknown (its label then is ``unknown`` with
    `reject_unknown`)."""
    n = len(probs)
    ood = torch.full((n,), float("nan")) if ood is None else ood
    unknown = torch.zeros(n, dtype=torch.bool) if unknown is None else unknown
    scores, indices = probs.topk(top_k, dim=1) if n else (probs, probs.long())
    rows = []
    for p, s, idx, o, u in zip(probs.tolist(), scores.tolist(), indices.tolist(), ood.tolist(), unknown.tolist()):
        label = UNKNOWN_LABEL if (u and reject_unknown) else class_names[idx[0]]
        rows.append({"label": label, "score": float(s[0]),
                     "top_labels": [class_names[i] for i in idx], "top_scores": [float(v) for v in s],
                     "probabilities": dict(zip(class_names, (float(v) for v in p))),
                     "ood_score": float(o), "unknown": bool(u)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _optional_float(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number, not {value!r}.") from None


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise BadRequest(f"{name} must be true or false, not {value!r}.")


def example_image_bytes(size: int = 8) -> bytes:
    """A tiny PNG, the model's input example."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 96, 64)).save(buf, format="PNG")
    return buf.getvalue()


MODEL_CODE = str(Path(__file__).with_name("model_code.py"))
