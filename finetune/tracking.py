"""MLflow: where runs go, and the few calls the rest of the code makes.

`MLFLOW_TRACKING_URI` wins when set. Otherwise runs go to a SQLite database under `./mlruns/` with
artifacts in `./mlruns/artifacts` (the file store is refused by MLflow 3), so everything about a run
lives under the top-level `mlruns/` folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow.tracking import MlflowClient

from finetune.errors import UserError


def mlruns_dir() -> Path:
    return Path.cwd() / "mlruns"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = mlruns_dir()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.resolve()}/mlflow.db"


def _default_artifact_location(experiment: str) -> str | None:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None  # the server (or the user's store) decides
    return (mlruns_dir().resolve() / "artifacts").as_uri()


def client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(name: str) -> str:
    """Experiment id for `name`, created (with artifacts under mlruns/) when missing."""
    c = client()
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                c.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        return c.create_experiment(name, artifact_location=_default_artifact_location(name))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"Cannot reach the MLflow tracking store at {tracking_uri()}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}. Start the server or fix "
                        "MLFLOW_TRACKING_URI (unset it to use ./mlruns).") from None


def flatten(prefix: str, value: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(f"{prefix}.{k}" if prefix else str(k), v)
    else:
        yield prefix, value


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log (nested) params; MLflow keeps values as strings of at most 6000 characters."""
    flat = {k: ("" if v is None else str(v))[:6000] for k, v in flatten("", params)}
    c = client()
    existing = c.get_run(run_id).data.params
    flat = {k: v for k, v in flat.items() if k not in existing}
    items = list(flat.items())
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    client().log_dict(run_id, data, artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        client().log_artifacts(run_id, str(path), artifact_path)
    else:
        client().log_artifact(run_id, str(path), artifact_path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path
