"""The MLflow pyfunc model: image bytes (or allowed paths) in, label + probabilities out.

Logged as *models-from-code* (`finetune/tracking/model_code.py` is the model's code), so nothing live is
pickled: the model carries `model.safetensors` + `model.json` (architecture, data config, class
names) as artifacts, and its `model_config` carries the default TTA mode, the plan and the pixel
limit. `load_context` rebuilds the network through `finetune.model.artifact.load_model`.

Load-time settings (`mlflow.pyfunc.load_model(uri, model_config={...})`, or environment variables
for `mlflow models serve`):

* ``path_root`` / ``FINETUNE_PATH_ROOT``: the only folder a request's `path` column may read from.
  Unset: `path` is refused, so a server never reads arbitrary files.
* ``max_image_pixels`` / ``FINETUNE_MAX_IMAGE_PIXELS``: larger images are refused before decoding
  (default: training's limit; a REST request's images at most 40 million pixels unless the environment
  variable is set).
* ``max_request_rows`` / ``FINETUNE_MAX_REQUEST_ROWS``: rows per request (default 256).
* ``max_request_bytes`` / ``FINETUNE_MAX_REQUEST_BYTES``: image bytes per request, the sizes of the files
  a `path` names included (default 32 MiB).
* ``batch_size``: crops per forward pass (default 32), and so the images decoded at a time: 32 centre
  crops, or 3 images' 10 crops with ``10crop`` (one image's crops when they are more).
* ``runtime`` / ``FINETUNE_RUNTIME``: ``auto`` (default: ONNX Runtime when the model carries an ONNX graph,
  from `finetune export --register`, and ONNX Runtime is installed; else torch), ``torch``, ``onnx`` or
  ``onnx-int8`` (an error naming what is missing when the graph or ONNX Runtime is not there).
* ``ood_threshold``: the unknown score above which an image is ``unknown`` (default: the model's own,
  set on held-out training images so that 95% of in-distribution images are kept).
* ``reject_unknown``: replace the label of an unknown image by ``unknown`` (default false: the label is
  kept and the ``unknown`` column says so).

An environment variable wins over the model_config key. A request over a limit, or with any unusable field,
gets HTTP 400 (`BadRequest`) with a message saying what to change; a request is decoded and run one
batch at a time, so its memory is bounded by the limits, not by its size.

Per request, ``params`` may override ``tta``, ``top_k``, ``ood_threshold`` and ``reject_unknown``.
Every output has ``ood_score`` (higher: less like the training images) and ``unknown`` beside ``label``
and ``score``; scores are calibrated (the model's temperature, `finetune.model.scoring`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from finetune import runtime
from finetune.model.artifact import load_model, load_scoring
from finetune.model.onnx import RUNTIME_FILES, OnnxRunner, check_graph, choose_runtime
from finetune.data.images import DEFAULT_MAX_PIXELS
from finetune.model.scoring import UNKNOWN_LABEL
from finetune.errors import UserError
from finetune.data.crops import TTA_VIEWS, CropViews, ViewsDataset
from finetune.evaluation.tta import score_views

log = logging.getLogger(__name__)

MODEL_DIR_ARTIFACT = "model_dir"
MODEL_CODE = str(Path(__file__).with_name("model_code.py"))  # the logged model's code (models-from-code)
DEFAULT_TOP_K = 3
DEFAULT_BATCH_SIZE = 32  # crops per forward pass (model_config "batch_size")
# Serving defaults. Pillow's 89M-pixel bomb limit let a 48 KB 16-bit PNG of 25M pixels cost 655 MB to decode;
# 40M pixels still takes a 36-megapixel photo. 256 rows and 32 MiB bound a request's work and memory.
SERVING_MAX_PIXELS = 40_000_000
DEFAULT_MAX_ROWS = 256
DEFAULT_MAX_BYTES = 32 * 2**20
# model_config key -> (environment variable, default) of each per-request limit
LIMITS = {"max_image_pixels": ("FINETUNE_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS),
          "max_request_rows": ("FINETUNE_MAX_REQUEST_ROWS", DEFAULT_MAX_ROWS),
          "max_request_bytes": ("FINETUNE_MAX_REQUEST_BYTES", DEFAULT_MAX_BYTES)}


class BadRequest(MlflowException):
    """A request the client must fix; the scoring server answers it with HTTP 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def resolve_allowed_path(path: str, root: str | None) -> str:
    """The real path of `path` if it lies under `root` (symlinks resolved), else BadRequest."""
    if not root:
        raise BadRequest("The 'path' column is disabled on this model: send the file's bytes in the 'image' "
                         "column, or load the model with path_root (FINETUNE_PATH_ROOT) set.")
    if "\x00" in path:
        raise BadRequest(f"path {path!r} contains a NUL byte: send a file name under the configured path_root.")
    real_root = os.path.realpath(root)
    try:
        real = os.path.realpath(os.path.join(real_root, path))
    except (ValueError, OSError) as e:  # text the file system cannot take (a lone surrogate, ...)
        raise BadRequest(f"path {path!r} is not a usable file path ({e}).") from None
    if os.path.commonpath([real, real_root]) != real_root:
        raise BadRequest(f"path {path!r} is outside the allowed root; only files under the configured "
                         "path_root can be read.")
    return real


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _as_bytes(value: Any) -> bytes | None:
    if _missing(value):
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
            check_graph(self.runner.metadata, self.model_dir, self.spec, RUNTIME_FILES[self.runtime_name])
        self.ood_threshold = _optional_float(config.get("ood_threshold"), "ood_threshold")
        self.reject_unknown = _flag(config.get("reject_unknown", False), "reject_unknown")
        self.batch_size = _setting(config, "batch_size", None, DEFAULT_BATCH_SIZE)
        self.default_tta = config.get("default_tta") or self.spec.default_tta or "center"
        self.plan = config.get("plan")
        self.path_root = config.get("path_root") or os.environ.get("FINETUNE_PATH_ROOT") or None
        self.max_pixels, self.max_rows, self.max_bytes = (_setting(config, key, *LIMITS[key]) for key in LIMITS)
        # What a request may send: the model's limit, at most SERVING_MAX_PIXELS unless the server's environment
        # sets FINETUNE_MAX_IMAGE_PIXELS (batch prediction and evaluation read `max_pixels`, training's limit).
        self.request_max_pixels = (self.max_pixels if os.environ.get("FINETUNE_MAX_IMAGE_PIXELS")
                                   else min(self.max_pixels, SERVING_MAX_PIXELS))

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    def _params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        params = params or {}
        if not isinstance(params, dict):
            raise BadRequest(f"params must be an object of names and values, not {type(params).__name__}.")
        tta = params.get("tta") or self.default_tta
        if not isinstance(tta, str) or tta not in TTA_VIEWS:
            raise BadRequest(f"Invalid tta {tta!r}. Valid values: {', '.join(TTA_VIEWS)}.")
        top_k = _integer(params.get("top_k"), "top_k", DEFAULT_TOP_K)
        if top_k < 1:
            raise BadRequest(f"top_k must be at least 1 (got {top_k}).")
        threshold = _optional_float(params.get("ood_threshold"), "ood_threshold")
        reject = params.get("reject_unknown")
        return {"tta": tta, "top_k": min(top_k, len(self.class_names)),
                "threshold": self.ood_threshold if threshold is None else threshold,
                "reject": self.reject_unknown if reject is None else _flag(reject, "reject_unknown")}

    def _sources(self, frame: pd.DataFrame) -> list[bytes | str]:
        """Each row's image bytes or allowed path, the request's row and byte limits checked as they are read."""
        if "image" not in frame.columns and "path" not in frame.columns:
            raise BadRequest(f"The input needs an 'image' column (image bytes, base64 in JSON) or a 'path' "
                             f"column; got columns {list(frame.columns)}.")
        if len(frame) > self.max_rows:
            raise BadRequest(f"The request has {len(frame)} rows, more than the limit of {self.max_rows} rows per "
                             "request: send fewer, or raise the limit (model_config max_request_rows, or "
                             "FINETUNE_MAX_REQUEST_ROWS for a server).")
        images = frame["image"] if "image" in frame.columns else [None] * len(frame)
        paths = frame["path"] if "path" in frame.columns else [None] * len(frame)
        sources: list[bytes | str] = []
        total = 0
        for row, (image, path) in enumerate(zip(images, paths)):
            data = _as_bytes(image)
            if data is not None:
                sources.append(data)
                total += len(data)
            elif isinstance(path, str) and path:
                sources.append(resolve_allowed_path(path, self.path_root))
                total += _file_size(sources[-1])
            elif not _missing(path) and not isinstance(path, str):
                raise BadRequest(f"Row {row}: the 'path' column must hold text, not {type(path).__name__}.")
            else:
                raise BadRequest(f"Row {row} has neither image bytes nor a path.")
            if total > self.max_bytes:
                raise BadRequest(f"The request's images reach {total} bytes at row {row}, more than the limit of "
                                 f"{self.max_bytes} bytes per request: send fewer or smaller images, or raise "
                                 "the limit (model_config max_request_bytes, or FINETUNE_MAX_REQUEST_BYTES for a "
                                 "server).")
        return sources

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            options = self._params(params)
            if not isinstance(model_input, pd.DataFrame):
                try:
                    model_input = pd.DataFrame(model_input)
                except (TypeError, ValueError) as e:
                    raise BadRequest(f"The input must be a table of rows ({e}).") from None
            probs, ood = self.predict_scores(self._sources(model_input), options["tta"])
            unknown = self.scoring.unknown(ood, options["threshold"])
            sets = self.scoring.label_sets(probs) if self.scoring.multi_label else None
            return format_predictions(probs, self.class_names, options["top_k"], ood, unknown, options["reject"], sets)
        except MlflowException:
            raise
        except Exception:  # a bug of ours, not the client's: the log has the traceback, the response does not
            log.exception("Prediction failed")
            raise MlflowException("The model failed on this request (an internal error; the server's log has the "
                                  "details).", error_code=INTERNAL_ERROR) from None

    def predict_scores(self, sources: list[bytes | str], tta: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated probabilities ``[N, K]`` and unknown scores ``[N]``; an unusable image fails the request.

        Decoded and run one chunk at a time: at most `batch_size` crops (one image's, when it has more) are held
        at once, whatever the number of images.
        """
        crops = CropViews(self.spec.data_config, tta)
        ds = ViewsDataset(sources, crops, self.spec.data_config, self.request_max_pixels)
        step = max(1, self.batch_size // crops.views)
        probs, ood = [torch.empty(0, len(self.class_names))], [torch.empty(0)]
        with torch.no_grad(), self.runtime.autocast():
            for start in range(0, len(ds), step):
                items = [ds[i] for i in range(start, min(start + step, len(ds)))]
                bad = [f"row {i}: {err}" for _, i, err in items if err]
                if bad:
                    raise BadRequest("Unusable image(s): " + "; ".join(bad[:10]))
                views = torch.stack([v for v, _, _ in items]).to(self.runtime.device)
                p, o = score_views(self.predictor, views, self.scoring, per_pass=self.batch_size)
                probs.append(p.float().cpu())
                ood.append(o.float().cpu())
        return torch.cat(probs), torch.cat(ood)

    @property
    def predictor(self) -> Any:
        """What the images go through: the ONNX Runtime session when the model runs on ONNX, else the network."""
        return self.runner if self.runner is not None else self.net

    @property
    def device(self) -> torch.device:
        return self.runtime.device


def load_logged_model(model_uri: str, model_config: dict[str, Any] | None = None) -> "ImageClassifierModel":
    """The finetune model behind a logged or registered MLflow model URI; a UserError when there is none, or when
    the model is not one finetune logged (`check_model_files`: it is refused before MLflow loads any of it)."""
    import mlflow

    from finetune import tracking

    tracking.client()
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
        check_model_files(local, model_uri)
        return mlflow.pyfunc.load_model(local, model_config=model_config or None).unwrap_python_model()
    except UserError:
        raise
    except Exception as e:  # unknown run, name, alias or version
        raise UserError(f"Cannot load model {model_uri!r}: {str(e).splitlines()[0][:300]}. Use runs:/RUN_ID/model "
                        "or models:/NAME@ALIAS (or models:/NAME/VERSION).") from None


CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader of a models-from-code model
# sha256 of every model_code.py finetune has logged: a file of that name with other contents is not ours
KNOWN_MODEL_CODE = frozenset({hashlib.sha256(Path(MODEL_CODE).read_bytes()).hexdigest()})


def check_model_files(local_path: str | Path, model_uri: str = "") -> None:
    """Refuse a downloaded model that would make MLflow run code or unpickle objects other than finetune's own:
    a python_function flavor without finetune's `model_code.py` (another loader, another code file, code folders
    put on the import path) or with a pickle. Loading runs the model's code, so only finetune's is accepted."""
    from mlflow.models import Model

    local_path = Path(local_path)
    try:
        flavor = Model.load(str(local_path / "MLmodel")).flavors.get("python_function") or {}
    except Exception as e:
        raise UserError(f"Cannot read the MLmodel of {model_uri or local_path}: "
                        f"{str(e).splitlines()[0][:300]}.") from None
    code = Path(str(flavor.get("model_code_path") or "")).name
    problems = []
    if flavor.get("loader_module") != CODE_LOADER or code != Path(MODEL_CODE).name:
        problems.append(f"its python_function flavor has no finetune code file ({Path(MODEL_CODE).name}; "
                        f"loader {flavor.get('loader_module')!r}, code file {code or None!r})")
    elif hashlib.sha256((local_path / code).read_bytes()).hexdigest() not in KNOWN_MODEL_CODE:
        problems.append(f"its {code} is not finetune's")
    if flavor.get("code"):
        problems.append(f"it puts code folders on the import path ({flavor['code']!r})")
    pickles = sorted(str(f.relative_to(local_path)) for f in local_path.rglob("*") if f.suffix in (".pkl", ".pickle"))
    if flavor.get("python_model") or pickles:
        problems.append(f"it carries a pickle ({', '.join(pickles) or flavor['python_model']})")
    if problems:
        raise UserError(f"Refusing to load {model_uri or local_path}: {'; '.join(problems)}. Loading would run that "
                        "code; finetune loads only the models it logs itself (finetune train, finetune export).")


COLUMNS = ["label", "score", "top_labels", "top_scores", "probabilities", "ood_score", "unknown"]
MULTI_LABEL_COLUMNS = ["labels", "top_labels", "top_scores", "probabilities", "ood_score", "unknown"]


def format_predictions(probs: torch.Tensor, class_names: list[str], top_k: int, ood: torch.Tensor | None = None,
                       unknown: torch.Tensor | None = None, reject_unknown: bool = False,
                       label_sets: list[list[int]] | None = None) -> pd.DataFrame:
    """One row per image: label, score, the top-k labels/scores, every class probability, the unknown score
    (NaN for a model without one) and whether the image is unknown (its label then is ``unknown`` with
    `reject_unknown`). A multi-label model (`label_sets`: each image's classes at the thresholds): `labels`, the
    list of those classes, in place of label and score."""
    if label_sets is not None:
        return _multi_label_rows(probs, class_names, top_k, label_sets)
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


def _multi_label_rows(probs: torch.Tensor, class_names: list[str], top_k: int,
                      label_sets: list[list[int]]) -> pd.DataFrame:
    scores, indices = probs.topk(top_k, dim=1) if len(probs) else (probs, probs.long())
    rows = [{"labels": [class_names[i] for i in chosen], "top_labels": [class_names[i] for i in idx],
             "top_scores": [float(v) for v in s], "probabilities": dict(zip(class_names, (float(v) for v in p))),
             "ood_score": float("nan"), "unknown": False}
            for p, s, idx, chosen in zip(probs.tolist(), scores.tolist(), indices.tolist(), label_sets)]
    return pd.DataFrame(rows, columns=MULTI_LABEL_COLUMNS)


def _optional_float(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, (bool, np.bool_)) or not np.isfinite(number):
        raise BadRequest(f"{name} must be a finite number, not {value!r}.")
    return number


def _integer(value: Any, name: str, default: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = int(value)
        if isinstance(value, (bool, np.bool_)) or number != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{name} must be an integer, not {value!r}.") from None
    return number


def _setting(config: dict[str, Any], key: str, env: str | None, default: int) -> int:
    """A positive integer setting: its environment variable (a server's), else model_config's key, else the
    default; a bad value is a UserError at load."""
    raw = (os.environ.get(env) if env else None) or config.get(key)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
    except (TypeError, ValueError):
        where = f"{env} or model_config {key}" if env else f"model_config {key}"
        raise UserError(f"{where} must be a positive integer, not {raw!r}.") from None
    return value


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # missing or unreadable: the decoder says so for its row
        return 0


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
