"""Small file helpers shared by every stage: every file is written to a temporary name in its own folder,
flushed, fsynced and renamed, so a crash or a full disk leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
import tempfile
from typing import IO, Any, Iterator


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it is fsynced and renamed to `path`.

    On any error (a full disk, an exception in the block) the temporary file is removed and `path` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + fsync + rename), so a crash never leaves half a file."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    return Path(path)
