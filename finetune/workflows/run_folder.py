"""One output folder per run: claimed under a lock, tied to its MLflow run, checked again on resume.

A training run holds an exclusive lock on `OUTPUT/.finetune.lock` from the moment it claims the folder
until it ends, and writes its run id to `OUTPUT/run.json`. A folder that holds anything else is refused,
unless it is the same run being resumed; a run that another process holds cannot be resumed. The list of
the run's files (`files.json`, and its digest in every checkpoint) makes a resumed run fail with what
changed instead of silently training on other images.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from finetune.data.folders import FolderSplits, base_folder
from finetune.errors import UserError
from finetune.files import write_json

LOCK_FILE = ".finetune.lock"
RUN_FILE = "run.json"
FILES_FILE = "files.json"
_held: dict[Path, int] = {}  # folder -> the lock file's descriptor, held by this process


def file_list(splits: FolderSplits) -> list[str]:
    """Every image the run reads, as `split<TAB>class<TAB>path relative to the data folder`, sorted."""
    root = os.path.abspath(base_folder(splits.root))  # relative to the data folder (or the label file's), wherever the command runs from
    rows = []
    for split, samples in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        for s in samples:
            rel = os.path.relpath(os.path.abspath(s.path), root)
            rows.append(f"{split}\t{splits.classes[s.label]}\t{rel}")
    return sorted(rows)


def digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()


def _lock(folder: Path) -> int | None:
    """The lock file's descriptor with the lock held, or None when another process holds it."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _holder(folder: Path) -> str:
    with contextlib.suppress(OSError):
        pid = (folder / LOCK_FILE).read_text().strip()
        if pid:
            return f" (process {pid})"
    return ""


def saved_run_id(folder: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads((folder / RUN_FILE).read_text())["run_id"]
    return None


def claim(folder: str | Path, run_id: str | None = None, resuming: bool = False) -> Path:
    """Take `folder` for this process's run: locked until `release`, refused when busy or another run's.

    `resuming`: the folder is expected to hold `run_id`'s files. Otherwise it must be empty (or not exist),
    and `run_id` (when known) is written to `run.json`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder)
    if fd is None:
        raise _in_use(folder, run_id if resuming else None)
    try:
        _check_contents(folder, run_id, resuming)
    except BaseException:
        os.close(fd)
        raise
    _held[folder.resolve()] = fd
    if run_id is not None and not resuming:
        record(folder, run_id)
    return folder.resolve()


def _in_use(folder: Path, resumed_run: str | None = None) -> UserError:
    what = f"run {resumed_run}" if resumed_run else "another run"
    return UserError(f"{folder} is in use: {what} is training there now{_holder(folder)}. Wait for it to end, "
                     f"or {'stop that process first' if resumed_run else 'pass another --output'}.")


def _check_contents(folder: Path, run_id: str | None, resuming: bool) -> None:
    if resuming:
        owner = saved_run_id(folder)
        if owner is not None and owner != run_id:
            raise UserError(f"{folder} belongs to MLflow run {owner}, not {run_id}: it cannot be resumed from there.")
        return
    # A claim killed before its MLflow run existed leaves the lock and the config alone: nothing to lose there.
    claimed_only = {LOCK_FILE} if (folder / RUN_FILE).exists() else {LOCK_FILE, "config.json"}
    others = sorted(p.name for p in folder.iterdir() if p.name not in claimed_only)
    if others:
        owner = saved_run_id(folder)
        hint = f"resume that run with --resume {owner}, or pass" if owner else "pass"
        raise UserError(f"Output folder {folder} is not empty ({', '.join(others[:5])}"
                        f"{', ...' if len(others) > 5 else ''}): a run never writes into another run's folder. "
                        f"To continue, {hint} a new --output (or leave it out for a fresh folder).")


def check_free(folder: str | Path) -> None:
    """The refusals of `claim`, early and without taking the lock: a run checks its `--output` before hours of
    measuring, and claims it (locked, checked again) when the run starts."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if is_held_elsewhere(folder):
        raise _in_use(folder)
    _check_contents(folder, None, resuming=False)


def record(folder: str | Path, run_id: str) -> None:
    write_json(Path(folder) / RUN_FILE, {"run_id": run_id})


def is_held_elsewhere(folder: str | Path) -> bool:
    """Whether another process holds `folder`'s lock now (a live run)."""
    folder = Path(folder)
    if folder.resolve() in _held or not (folder / LOCK_FILE).exists():
        return False
    # A shared probe: two processes asking at once (the ranks of a resumed DDP run) do not block each other, and
    # the holder's pid in the file stays.
    fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def release(folder: str | Path | None = None) -> None:
    """Give up this process's lock on `folder` (every folder it holds when None)."""
    folders = list(_held) if folder is None else [Path(folder).resolve()]
    for f in folders:
        fd = _held.pop(f, None)
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def held_for_this_call() -> Iterator[None]:
    """Release the folders claimed inside the block when it ends, however it ends."""
    before = set(_held)
    try:
        yield
    finally:
        for f in set(_held) - before:
            release(f)


def check_files(output: Path, expected: str | None, splits: FolderSplits, run_id: str) -> None:
    """A resumed run must read the same images as before; the error says what changed."""
    files = file_list(splits)
    if expected is None or digest(files) == expected:
        return
    saved_path = output / FILES_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    detail = ""
    if saved is not None:
        # Rows are split<TAB>class<TAB>path; one file more or less moves others between the splits, so the files
        # are compared by class and path, the splits only when nothing else changed.
        now, before = ({r.split("\t", 1)[1] for r in rows} for rows in (files, saved))
        added, removed = sorted(now - before), sorted(before - now)
        show = lambda rows: ", ".join(r.replace("\t", ":") for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        detail = (f" {len(added)} added{': ' + show(added) if added else ''};"
                  f" {len(removed)} removed{': ' + show(removed) if removed else ''}"
                  f"{'' if added or removed else ' (the same files, split differently)'}.")
    raise UserError(f"The images of run {run_id} changed since it started (class:path).{detail} "
                    "A resumed run must read the same files: restore them, or start a new run.")


def run_identity(splits: FolderSplits, output: Path, run_id: str) -> dict[str, Any]:
    """What every checkpoint of the run records about it; `files.json` is written beside, once."""
    files = file_list(splits)
    if not (output / FILES_FILE).is_file():
        write_json(output / FILES_FILE, files)
    return {"run_id": run_id, "files_sha256": digest(files), "files": len(files)}
