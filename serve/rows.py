"""Rows of batch prediction: from a batch's probabilities to CSV lines in a run's own partial file, and from the
partial files to the output (CSV or Parquet), which appears by rename only when every image is done.

Partial files: every run appends to files of its own, `.NAME.partial.<token>.rank<r>.csv` (one per
rank, the token new for each run), created exclusively, each batch flushed and fsynced, and holds an
exclusive `flock` on them while it writes. So a run never truncates rows of an earlier one: those stay
on disk until an output that holds them has replaced the old one, and only then are they deleted; a
file locked by a live run is neither read as done nor deleted. A run without `--resume` leaves earlier
partial files as they are.

`path` is the image's path as found in the folder or list. Outputs are valid UTF-8 whatever the
file names: a byte of a name that is not UTF-8 is written as `\\xNN` (`row_path`), so every file
keeps a row of its own and CSV and Parquet hold the same text.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import fcntl
import glob
import hashlib
import io
import logging
import os
import secrets
from pathlib import Path
from typing import Sequence

import torch

from finetune.errors import UserError
from finetune.files import fsync_dir, replacing
from finetune.model.scoring import UNKNOWN_LABEL, Scoring

log = logging.getLogger("serve.batch_predict")

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def columns(top_k: int, multi_label: bool = False) -> list[str]:
    """A row's columns; a multi-label model's rows have `labels` (its classes at the thresholds, `;` between
    them) in place of label and score."""
    cols = ["path", "labels"] if multi_label else ["path", "label", "score"]
    for i in range(1, top_k + 1):
        cols += [f"top{i}_label", f"top{i}_score"]
    return cols + ["ood_score", "unknown", "error"]


@dataclasses.dataclass
class Rejection:
    """How rows treat unknown images: the threshold on `ood_score` (None: the model's) and whether the label of
    an unknown image becomes ``unknown`` (`--reject-unknown`) or is kept."""

    scoring: Scoring
    threshold: float | None = None
    reject: bool = False


def row_path(path: str) -> str:
    """The `path` of a row: the path itself, with each byte that is not UTF-8 written as `\\xNN`.

    Undecodable bytes of a file name come from the OS as surrogates, which neither a UTF-8 CSV nor
    Parquet can hold. Unlike `display_path` (U+FFFD) this keeps two such names apart, so rows and
    `--resume` still match one file each.
    """
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def output_format(output: Path) -> str:
    fmt = FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise UserError(f"Output {output} must end in {', '.join(FORMATS)} (CSV or Parquet).")
    return fmt


def partial_files(output: Path) -> list[str]:
    """Partial files of every run on `output`, live or not (also the `.partial.rank<r>.csv` of older versions)."""
    return sorted(glob.glob(str(output.parent / f".{output.name}.partial*.csv")))


def new_token() -> str:
    """A run's token: its start time first, so tokens sort as runs started, then random bits for uniqueness."""
    return f"{datetime.datetime.now():%Y%m%dT%H%M%S%f}-{secrets.token_hex(3)}"


def partial_path(output: Path, token: str, rank: int) -> Path:
    """The partial CSV that process `rank` of the run named `token` appends its rows to."""
    return output.parent / f".{output.name}.partial.{token}.rank{rank}.csv"


@contextlib.contextmanager
def claimed(path: str | Path):
    """Holds `path`'s lock for the block and yields True; yields False when a live run holds it, or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _read_partial(path: str) -> list[list[str]]:
    """Rows of a partial CSV; a last line cut short by a crash is dropped."""
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    return list(csv.reader(io.StringIO(text, newline="")))  # a name may hold a newline or U+2028: csv quotes it


def read_output(output: Path):
    """The rows of a finished output file (CSV or Parquet) as strings."""
    import pandas as pd

    if output_format(output) == "csv":
        return pd.read_csv(output, dtype=str, keep_default_na=False)
    return pd.read_parquet(output).astype(str).replace({"nan": "", "None": ""})


def _with_mtimes(paths: list[str]) -> list[tuple[int, str]]:
    """``(mtime_ns, path)`` of each path that still exists."""
    found = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            found.append((os.stat(path).st_mtime_ns, path))
    return found


def load_done(output: Path, cols: list[str]):
    """Rows already predicted, one per path, and the partial files they were read from.

    Reads the output and every partial file no live run holds. Where sources disagree on a path, the
    newest (last modified) wins: an earlier run's partial file left beside a newer output (a run
    without `--resume` leaves them) does not override it. Rows keep the output's order, then the partial files'.
    """
    import pandas as pd

    frames, read = [], []
    if output.exists():
        frames.append((output.stat().st_mtime_ns, read_output(output)))
    for mtime, path in sorted(_with_mtimes(partial_files(output))):
        with claimed(path) as ours:
            if not ours:
                continue  # a live run's rows are not done yet (or another run just finalized them)
            rows = _read_partial(path)
        read.append(Path(path))
        if rows:
            frames.append((mtime, pd.DataFrame(rows[1:], columns=rows[0])))
    for _, frame in frames:
        if list(frame.columns) != cols:
            raise UserError(f"{output} (or its partial file) has columns {list(frame.columns)}, but this run "
                            f"writes {cols}. Use the same --top-k as before, or drop --resume.")
    if not frames:
        return pd.DataFrame(columns=cols), read
    stacked = pd.concat([f.assign(_mtime=t) for t, f in frames], ignore_index=True)
    newest = stacked.sort_values("_mtime", kind="stable").drop_duplicates("path", keep="last").index
    return stacked.loc[sorted(newest), cols].reset_index(drop=True), read


# Descriptors of partial files this process holds locked. A process forked while one is open (a DataLoader
# worker) would share the lock and keep it after this process died, making a dead run's file look live.
_LOCKED_FDS: set[int] = set()


def _drop_locks_in_child() -> None:
    if _LOCKED_FDS:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in _LOCKED_FDS:
            os.dup2(null, fd)  # the child's reference to the locked file goes; the number stays valid
        os.close(null)
        _LOCKED_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def create_locked(path: Path, header: list[str]):
    """A new partial file at `path` holding `header`, locked by this process; never an existing file.

    It is written and locked under a temporary name first, so no reader sees it unlocked or empty.
    """
    new = path.with_name(path.name + ".new")  # not a partial file's name
    f = open(new, "x", newline="", encoding="utf-8", errors="surrogateescape")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        _LOCKED_FDS.add(f.fileno())
        csv.writer(f).writerow(header)
        f.flush()
        os.fsync(f.fileno())
        os.link(new, path)  # unlike a rename, refuses to replace a file that exists
    except BaseException:
        _LOCKED_FDS.discard(f.fileno())
        f.close()
        raise
    finally:
        os.unlink(new)
    fsync_dir(path.parent)
    return f


class RowWriter:
    """Appends each batch's rows to one process's partial CSV of this run (`token`), flushed and fsynced,
    so a crash loses one batch at most.

    The only code that turns predictions into rows: the plain loop and Lightning's (sharded) predict
    loop both hand it ``(probs [B, K], index [B], errors)`` per batch.
    """

    def __init__(self, output: Path, paths: Sequence[str], class_names: list[str], top_k: int,
                 rejection: Rejection | None = None, token: str | None = None):
        self.output, self.paths, self.class_names, self.top_k = output, paths, class_names, top_k
        self.rejection = rejection or Rejection(Scoring())
        self.token = token or new_token()
        self.file = None
        self.writer = None

    def open(self, rank: int = 0) -> None:
        """Creates this run's partial file for `rank` and holds its lock until `close`."""
        self.path = partial_path(self.output, self.token, rank)
        self.file = create_locked(self.path, columns(self.top_k, self.rejection.scoring.multi_label))
        self.writer = csv.writer(self.file)

    def write(self, probs: torch.Tensor, index: torch.Tensor, errors: Sequence[str],
              ood: torch.Tensor | None = None) -> None:
        scores, top = probs.topk(self.top_k, dim=1)
        ood = torch.full((len(probs),), float("nan")) if ood is None else ood
        scoring = self.rejection.scoring
        unknown = scoring.unknown(ood, self.rejection.threshold).tolist()
        sets = scoring.label_sets(probs) if scoring.multi_label else [None] * len(probs)
        lead = 1 if scoring.multi_label else 2  # labels, or label and score
        for i, err, s, t, o, u, chosen in zip(index.tolist(), errors, scores.tolist(), top.tolist(), ood.tolist(),
                                              unknown, sets):
            path = row_path(self.paths[i])
            if err:
                # An error may quote the path, so it gets the same treatment.
                self.writer.writerow([path] + [""] * lead + ["", ""] * self.top_k + ["", "", row_path(err)])
                continue
            pairs = [v for j, score in zip(t, s) for v in (self.class_names[j], f"{score:.6g}")]
            if chosen is not None:
                answer = [";".join(self.class_names[j] for j in chosen)]
            else:
                answer = [UNKNOWN_LABEL if (u and self.rejection.reject) else self.class_names[t[0]], f"{s[0]:.6g}"]
            self.writer.writerow([path, *answer, *pairs, f"{o:.6g}", str(bool(u)).lower(), ""])
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            _LOCKED_FDS.discard(self.file.fileno())
            self.file.close()  # releases the lock
            self.file = None


def digest(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(row_path(p) for p in paths).encode()).hexdigest()


def _arrow_schema(cols: list[str]):
    import pyarrow as pa

    return pa.schema([(c, pa.float64() if c == "score" or c.endswith("_score") else pa.string()) for c in cols])


def finalize(output: Path, done, cols: list[str], new_parts: list[Path], read_parts: Sequence[Path] = ()) -> None:
    """Write done rows + new partial rows to a temp file, then rename it to the output.

    Only then are partial files deleted: `new_parts` (this run's) and `read_parts` (earlier runs' whose
    rows are in `done`), each unless a live process holds it. Other partial files are left as they are.
    """
    with replacing(output) as tmp:
        if output_format(output) == "parquet":
            _write_parquet(tmp, done, cols, new_parts)
        else:
            with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                done.to_csv(f, index=False, columns=cols)
                for part in new_parts:
                    with open(part, encoding="utf-8", errors="surrogateescape") as src:
                        next(src, None)  # header
                        for line in src:
                            f.write(line)
    for path in [*new_parts, *read_parts]:
        with claimed(path) as ours:
            if ours:
                os.remove(path)


def _write_parquet(tmp: Path, done, cols: list[str], new_parts: list[Path]) -> None:
    """Done rows, then the rows of each new partial file, into Parquet at `tmp` (the columns typed)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema = _arrow_schema(cols)
    convert = pacsv.ConvertOptions(column_types=schema, strings_can_be_null=False,
                                   null_values=[""], quoted_strings_can_be_null=False)
    with pq.ParquetWriter(tmp, schema) as writer:
        if len(done):
            frame = done[cols].copy()
            for c in cols:
                if schema.field(c).type == pa.float64():
                    frame[c] = frame[c].replace("", None).astype(float)
            writer.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False))
        for part in new_parts:
            reader = pacsv.open_csv(part, convert_options=convert)
            for chunk in reader:
                writer.write_batch(chunk)


def done_rows(output: Path, cols: list[str], resume: bool):
    """With `resume`, `load_done`; otherwise no rows, earlier partial files left on disk for a later `--resume`."""
    if resume:
        return load_done(output, cols)
    import pandas as pd

    if left := partial_files(output):
        log.warning("%d partial file(s) of earlier runs beside %s left as they are: --resume would keep their rows",
                    len(left), output)
    return pd.DataFrame(columns=cols), []

