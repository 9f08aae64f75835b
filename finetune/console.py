"""What a command prints: finetune's own messages, warnings from everyone, progress bars; not the
libraries' chatter (Lightning's accelerator lines and tips, MLflow's table creation, artifact download
bars, pip-version and registration notices). `--verbose` shows everything."""

from __future__ import annotations

import logging
import os
import warnings

# Read by MLflow when it is imported and when it logs a model; a value the user set wins.
_QUIET_MLFLOW = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars of local files
}
# Loggers whose warnings are noise here: the pip version only matters for conda environments, which
# finetune's pinned pip requirements do not use.
_SILENCED = ("mlflow.utils.environment",)
# Deprecations inside the libraries themselves, which a user cannot act on.
_LIBRARY_DEPRECATIONS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",)


def _ours_or_important(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in ("finetune", "serve", "__main__")


def setup(verbose: bool = False) -> None:
    """Configure logging for a command (call before the libraries are imported). A process whose
    logging is already configured (an embedding application, pytest) keeps its handlers."""
    logging.getLogger("finetune").setLevel(logging.INFO)
    if not verbose:
        for name, value in _QUIET_MLFLOW.items():
            os.environ.setdefault(name, value)
        for name in _SILENCED:
            logging.getLogger(name).setLevel(logging.ERROR)
        for message in _LIBRARY_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message)
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        # Lightning sets its loggers to INFO when it is imported (after this runs), so the filter sits
        # on the handler that prints rather than on their levels.
        handler.addFilter(_ours_or_important)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
