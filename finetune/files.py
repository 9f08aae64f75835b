"""Small file helpers shared by every stage: every file is written under a temporary name in its own folder,
flushed to disk and renamed, so a crash or a full disk leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import IO, Any, Iterator


def fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (a no-op where a folder cannot be fsynced)."""
    with contextlib.suppress(OSError):
        fsync(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        # mkstemp makes the file 0600; the file gets the mode a plain open() would have given it, so a server or a
        # teammate running as another user can still read a model.
        os.chmod(tmp, 0o666 & ~_umask())
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """`replacing`, as an open file: what the block writes replaces `path` only once it is all on disk."""
    with replacing(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def copy_file(source: str | Path, target: str | Path) -> str:
    """Copy one file atomically (`shutil.copytree`'s copy_function signature)."""
    with replacing(target) as tmp:
        shutil.copyfile(source, tmp)
    return str(target)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + fsync + rename), so a crash never leaves half a file."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    return Path(path)
