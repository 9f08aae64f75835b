"""`finetune serve MODEL_URI`: the REST server, which is `mlflow models serve` with finetune's settings.

The model is loaded here once first, so a URI that does not resolve, or a model finetune did not log (refused
before any of its code runs, `finetune.tracking.pyfunc.check_model_files`), is a one-line error instead of a
server that dies while starting. Then this process becomes `mlflow models serve --env-manager local`: the
same Python environment (its `mlflow`, and its `bin/` first on PATH, where uvicorn is), the same tracking
store, and the limits as the FINETUNE_* environment variables the pyfunc model reads at load time.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 5000
    path_root: str | None = None  # the only folder a request's `path` column may read from (unset: refused)
    max_image_pixels: int | None = None
    runtime: str | None = None  # auto, torch, onnx, onnx-int8 (None: the model's own, auto)


def mlflow_executable() -> str:
    """The `mlflow` of the Python environment running finetune (beside its interpreter), else the one on PATH."""
    beside = Path(sys.executable).with_name("mlflow")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mlflow")
    if found is None:
        raise UserError("Cannot find the `mlflow` command of this Python environment. Reinstall finetune "
                        "(pip install finetune) in the environment you run it from.")
    return found


def server_command(model_uri: str, options: ServeOptions) -> list[str]:
    return [mlflow_executable(), "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", options.host, "-p", str(options.port)]


def server_env(options: ServeOptions, tracking_uri: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: `base` (this process's), the tracking store, PATH with this environment's
    bin/ first (uvicorn), and the FINETUNE_* settings given (others stay as the user set them)."""
    env = dict(os.environ if base is None else base)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]).rstrip(os.pathsep)
    if options.path_root is not None:
        env["FINETUNE_PATH_ROOT"] = str(Path(options.path_root).resolve())
    if options.max_image_pixels is not None:
        env["FINETUNE_MAX_IMAGE_PIXELS"] = str(options.max_image_pixels)
    if options.runtime is not None:
        env["FINETUNE_RUNTIME"] = options.runtime
    return env


def check_model(model_uri: str, options: ServeOptions) -> None:
    """Load the model as the server will (the same runtime); a UserError when it cannot be served."""
    from finetune.tracking.pyfunc import load_logged_model

    if options.path_root is not None and not Path(options.path_root).is_dir():
        raise UserError(f"--path-root {options.path_root} is not a folder.")
    load_logged_model(model_uri, {"runtime": options.runtime} if options.runtime else None)


def serve(model_uri: str, options: ServeOptions) -> None:
    """Check the model, then replace this process by the server (it never returns)."""
    from finetune import tracking

    check_model(model_uri, options)
    argv = server_command(model_uri, options)
    env = server_env(options, tracking.tracking_uri())
    log.info("Serving %s at http://%s:%d (POST /invocations, GET /ping); Ctrl-C stops it", model_uri,
             options.host, options.port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
