"""MLflow: where runs go, and the few calls the rest of the code makes.

`MLFLOW_TRACKING_URI` wins when set. Otherwise runs go to a SQLite database under `./mlruns/` with
artifacts in `./mlruns/artifacts` (the file store is refused by MLflow 3), so everything about a run
lives under the top-level `mlruns/` folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.exceptions import MlflowException

from finetune.errors import UserError
from finetune.files import write_json


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


# --- Reliability: fail fast when the store is unreachable, keep working when it goes away mid-run ---

REACHABILITY_TIMEOUT_S = 5.0
PENDING_FILE = "mlflow_pending.json"


def check_reachable(uri: str | None = None, timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail in seconds, not minutes, when an HTTP tracking server does not answer.

    MLflow's own client retries a refused connection for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES);
    one short request without retries tells a typo or a stopped server apart before any work is done.
    Any HTTP answer counts as reachable (auth and paths are MLflow's business, not ours).
    """
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        _check_store(uri)
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        reason = type(e).__name__ if not str(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
        raise UserError(f"Cannot reach the MLflow tracking server at {uri} ({reason}). Start the server or "
                        "fix MLFLOW_TRACKING_URI (unset it to use ./mlruns).") from None
    # Once it answered, a store that goes away later should fail a call in seconds, not hang a
    # finished training for minutes; the user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _check_store(uri: str) -> None:
    """A local store MLflow refuses (a file:// store, which MLflow 3 no longer writes to; a path it cannot
    create) is a UserError before any work is done, not a traceback after the measurement."""
    try:
        MlflowClient(tracking_uri=uri)
    except MlflowException as e:
        raise UserError(f"MLflow cannot use the tracking store {uri} ({_describe(e)}). Set MLFLOW_TRACKING_URI to "
                        "a database (e.g. sqlite:///mlruns/mlflow.db) or a server, or unset it to use "
                        "./mlruns.") from None


def _describe(e: BaseException) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# A store that fails a call once (SQLite's "database is locked" while another run writes, a server's restart) is
# asked again after these pauses before the run gives up on it and keeps the rest in OUTPUT/mlflow_pending.json.
RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0)


def retrying(fn, *args: Any, delays: tuple[float, ...] | None = None, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, asked again after each pause of `delays` (RETRY_DELAYS_S) while it raises."""
    pauses = RETRY_DELAYS_S if delays is None else delays
    for pause in (*pauses, None):
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except Exception as e:
            if pause is None:
                raise
            logging.getLogger(__name__).debug("MLflow call failed (%s); again in %.1fs", _describe(e), pause)
            time.sleep(pause)


@contextlib.contextmanager
def store_lock(name: str) -> Iterator[None]:
    """Serialize a check-then-set on the tracking store between processes of this machine (or of a shared
    filesystem): an exclusive lock on a file beside a SQLite store's database. A server store has no lock to take
    here; the block then runs as it is."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f".{db.name}.{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def end_run_if_running(run_id: str, status: str) -> None:
    """End the run with `status` unless it has ended already; the store being down is not an error here (the run's
    output folder has everything), since this runs while another error is on its way to the user."""
    try:
        c = client()
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, status)
    except Exception as e:
        logging.getLogger(__name__).warning("Could not mark MLflow run %s %s (%s)", run_id, status, _describe(e))


class PendingLog:
    """What could not be sent to MLflow, kept in OUTPUT/mlflow_pending.json for `finetune upload`."""

    def __init__(self, output: str | Path, run_id: str | None):
        self.path = Path(output) / PENDING_FILE
        self.run_id = run_id
        self.metrics: list[dict[str, Any]] = []
        self.steps: list[str] = []  # artifacts and status changes still to do, in order
        self.error: str | None = None

    def failed(self, what: str, e: BaseException) -> None:
        if self.error is None:
            logging.getLogger(__name__).warning(
                "MLflow store %s unreachable (%s); training goes on, results are kept in %s",
                tracking_uri(), _describe(e), self.path.parent)
        self.error = _describe(e)

    def add_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.extend({"key": k, "value": float(v), "step": int(step)} for k, v in metrics.items())
        self.save()

    def save(self) -> None:
        if self.error is not None:
            write_json(self.path, {"run_id": self.run_id, "tracking_uri": tracking_uri(), "error": self.error,
                                   "metrics": self.metrics, "finish": self.steps})

    @property
    def active(self) -> bool:
        return self.error is not None


def upload_pending(output: str | Path) -> dict[str, Any]:
    """Send what a run could not log (metrics, artifacts, final status) once the store is back."""
    output = Path(output)
    path = output / PENDING_FILE
    if not path.is_file():
        raise UserError(f"Nothing to upload: {path} does not exist (the run was logged completely).")
    pending = json.loads(path.read_text())
    run_id = pending["run_id"]
    c = client()
    try:
        c.get_run(run_id)
    except Exception as e:
        raise UserError(f"Cannot reach MLflow run {run_id} at {tracking_uri()} ({_describe(e)}). The store must "
                        "be reachable, and MLFLOW_TRACKING_URI the one the run was created in.") from None
    metrics = [mlflow.entities.Metric(m["key"], m["value"], 0, m["step"]) for m in pending["metrics"]]
    for i in range(0, len(metrics), 500):
        c.log_batch(run_id, metrics=metrics[i:i + 500])
    summary = json.loads((output / "summary.json").read_text()) if (output / "summary.json").is_file() else {}
    for step in pending.get("finish", []):
        if step == "final_metrics":
            for name, value in summary.get("metrics", {}).items():
                if isinstance(value, (int, float)):
                    c.log_metric(run_id, f"final_{name}", value)
        elif step == "model_files":
            log_artifact(run_id, output / "model", "model_files")
        elif step == "summary":
            log_artifact(run_id, output / "summary.json")
        elif step == "terminate":
            c.set_terminated(run_id, "FINISHED")
    path.unlink()
    return {"run_id": run_id, "metrics": len(metrics), "steps": pending.get("finish", [])}


FINISH_STEPS = ("final_metrics", "model_files", "summary", "terminate")


def finish_run(run_id: str, output: Path, metrics: dict[str, float], pending: PendingLog) -> bool:
    """Log the final metrics and artifacts; what fails is kept in `pending` for `finetune upload`.

    Returns:
        True when everything reached MLflow.
    """
    steps = list(FINISH_STEPS)
    if not pending.active:
        try:
            c = client()
            for step in FINISH_STEPS:
                if step == "final_metrics":
                    final = [mlflow.entities.Metric(f"final_{k}", v, int(time.time() * 1000), 0) for k, v in metrics.items()]
                    retrying(c.log_batch, run_id, metrics=final)
                elif step == "model_files":
                    retrying(log_artifact, run_id, output / "model", "model_files")
                elif step == "summary":
                    retrying(log_artifact, run_id, output / "summary.json")
                else:
                    retrying(c.set_terminated, run_id, "FINISHED")
                steps.pop(0)
        except Exception as e:
            pending.failed(steps[0], e)
    if not pending.active:
        return True
    pending.steps = steps
    pending.save()
    return False


def _rank_zero_only(fn):
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return rank_zero_only(fn)


def resilient_logger(experiment: str, run_id: str | None, pending: PendingLog):
    """Lightning's MLFlowLogger, except that a store going away mid-run does not end the training:
    metrics that cannot be sent are kept in OUTPUT/mlflow_pending.json."""
    from pytorch_lightning.loggers import MLFlowLogger

    class ResilientMLFlowLogger(MLFlowLogger):
        @_rank_zero_only
        def log_metrics(self, metrics, step=None) -> None:
            if not pending.active:
                try:
                    return retrying(super().log_metrics, metrics, step)
                except Exception as e:
                    pending.failed("metrics", e)
            pending.add_metrics(dict(metrics), step or 0)

        @_rank_zero_only
        def finalize(self, status: str = "success") -> None:
            # The run is not over when a fit is: evaluation and the model follow. The workflow that started the run
            # ends it: `finish_run` FINISHED, or KILLED / FAILED when an interruption or an error stops it.
            return

    return ResilientMLFlowLogger(experiment_name=experiment, tracking_uri=tracking_uri(), run_id=run_id)
