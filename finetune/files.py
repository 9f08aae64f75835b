"""Small file helpers shared by every stage."""

from __future__ import annotations

import json
import os
from pathlib import Path
import tempfile
from typing import Any


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
