"""Small file helpers shared by every stage: every file is written under a temporary name in its own folder,
flushed to disk and renamed, so a crash never leaves half a file under the real name."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any, Iterator


def fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; when the block succeeds it is fsynced and renamed to `path`,
    when it fails it is removed (and `path` is left as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def copy_file(source: str | Path, target: str | Path) -> str:
    """Copy one file atomically (`shutil.copytree`'s copy_function signature)."""
    with replacing(target) as tmp:
        shutil.copyfile(source, tmp)
    return str(target)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + fsync + rename), so a crash never leaves half a file."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    return Path(path)
