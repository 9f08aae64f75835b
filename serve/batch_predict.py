"""Batch prediction with a logged or registered model over a folder or a list of image paths.

    python -m serve.batch_predict --model-uri models:/NAME@champion --input DIR_OR_LIST --output preds.csv

One output row per input image: `path`, `label`, `score`, `top{i}_label`/`top{i}_score` and
`error` (unreadable files get a row with the error filled and no label; they never stop the run).
`path` is the image's path as found in the folder or list. Outputs are valid UTF-8 whatever the
file names: a byte of a name that is not UTF-8 is written as `\\xNN` (`row_path`), so every file
keeps a row of its own and CSV and Parquet hold the same text.
Images stream through a DataLoader into a plain forward loop on this process's device (at
training's precision); each batch's rows are appended to a partial CSV next to the output, so memory
stays flat, and the output (CSV or Parquet, by extension) appears by rename only when everything is
done. `--resume` keeps rows already in the output or left in partial files by interrupted runs,
and predicts only the rest.

Partial files: every run appends to files of its own, `.NAME.partial.<token>.rank<r>.csv` (one per
rank, the token new for each run), created exclusively, each batch flushed and fsynced, and holds an
exclusive `flock` on them while it writes. So a run never truncates rows of an earlier one: those stay
on disk until an output that holds them has replaced the old one, and only then are they deleted; a
file locked by a live run is neither read as done nor deleted. A run without `--resume` leaves earlier
partial files as they are.

Sharded: `--devices N --strategy ddp` runs one process per device through Lightning's predict loop
(imported only then: loading and running a model in one process never imports Lightning); Lightning
gives each rank a disjoint part of the inputs, each rank writes its own partial file through the same
row writer (rank 0's token, broadcast, names the files of all ranks), and rank 0 merges them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import dataclasses
import datetime
import fcntl
import glob
import hashlib
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Sequence

import click
import torch

from finetune import console
from finetune import runtime
from finetune.data.folders import iter_image_files
from finetune.data.images import IMAGE_EXTENSIONS
from finetune.errors import UserError
from finetune.files import fsync_dir, replacing
from finetune.data.crops import TTA_VIEWS, CropViews, ViewsDataset, collate_views
from finetune.evaluation.tta import score_views
from finetune.model.scoring import UNKNOWN_LABEL, Scoring
from serve.options import prediction_options, run_prediction

log = logging.getLogger("serve.batch_predict")

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def columns(top_k: int) -> list[str]:
    cols = ["path", "label", "score"]
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


def list_inputs(source: str | Path) -> list[str]:
    """Image paths of a folder (recursive, sorted), a CSV with a `path` column, or a text list."""
    source = Path(source)
    if source.is_dir():
        return iter_image_files(source)
    if not source.is_file():
        raise UserError(f"Input not found: {source}. Pass a folder of images, a .csv with a 'path' column, "
                        "or a text file with one path per line.")
    if source.suffix.lower() == ".csv":
        import pandas as pd

        # object, not str: pandas' Arrow strings cannot hold a non-UTF-8 name (a surrogate).
        frame = pd.read_csv(source, dtype=object, keep_default_na=False, encoding_errors="surrogateescape")
        if "path" not in frame.columns:
            raise UserError(f"{source} has no 'path' column (columns: {', '.join(frame.columns)}).")
        return [p for p in frame["path"].tolist() if p]
    lines = source.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def list_sources(sources: Sequence[str | Path]) -> list[str]:
    """Image paths of several inputs (folders, CSVs, text lists, image files) in the order given, each path once."""
    paths: list[str] = []
    for source in sources:
        is_image = Path(source).is_file() and Path(source).suffix.lower() in IMAGE_EXTENSIONS
        paths += [str(source)] if is_image else list_inputs(source)
    return list(dict.fromkeys(paths))


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
        self.file = create_locked(self.path, columns(self.top_k))
        self.writer = csv.writer(self.file)

    def write(self, probs: torch.Tensor, index: torch.Tensor, errors: Sequence[str],
              ood: torch.Tensor | None = None) -> None:
        scores, top = probs.topk(self.top_k, dim=1)
        ood = torch.full((len(probs),), float("nan")) if ood is None else ood
        unknown = self.rejection.scoring.unknown(ood, self.rejection.threshold).tolist()
        for i, err, s, t, o, u in zip(index.tolist(), errors, scores.tolist(), top.tolist(), ood.tolist(), unknown):
            path = row_path(self.paths[i])
            if err:
                # An error may quote the path, so it gets the same treatment.
                self.writer.writerow([path, "", ""] + ["", ""] * self.top_k + ["", "", row_path(err)])
                continue
            pairs = [v for j, score in zip(t, s) for v in (self.class_names[j], f"{score:.6g}")]
            label = UNKNOWN_LABEL if (u and self.rejection.reject) else self.class_names[t[0]]
            self.writer.writerow([path, label, f"{s[0]:.6g}", *pairs, f"{o:.6g}", str(bool(u)).lower(), ""])
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            _LOCKED_FDS.discard(self.file.fileno())
            self.file.close()  # releases the lock
            self.file = None


_LIGHTNING_CLASSES: dict[str, type] = {}


def _lightning_classes() -> dict[str, type]:
    """`ViewsPredictor` and `CsvRowWriter`, Lightning adapters around `score_views` and `RowWriter`.

    Built on first use, so that importing this module (and predicting in one process) does not import
    Lightning. They are reachable as module attributes (`__getattr__` below), so pickling them for
    `ddp_spawn` keeps working.
    """
    if _LIGHTNING_CLASSES:
        return _LIGHTNING_CLASSES
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import BasePredictionWriter

    class ViewsPredictor(pl.LightningModule):
        """Lightning wrapper for predict: crops of a batch of images -> mean softmax per image."""

        def __init__(self, net: torch.nn.Module, scoring: Scoring):
            super().__init__()
            self.net, self.scoring = net, scoring

        def predict_step(self, batch, batch_idx):
            views, index, errors = batch
            probs, ood = score_views(self.net, views, self.scoring)
            return probs.float().cpu(), index.cpu(), errors, ood.float().cpu()

    class CsvRowWriter(BasePredictionWriter):
        """`RowWriter` as a Lightning prediction writer: each rank writes its own partial file of the run."""

        def __init__(self, rows: RowWriter):
            super().__init__(write_interval="batch")
            self.rows = rows

        def setup(self, trainer, pl_module, stage=None) -> None:
            # Lightning's ddp re-runs the command for each rank, so each process drew a token of its own:
            # rank 0's names the run (rank 0 merges by it). Each rank listed the images left on its own,
            # and Lightning shards indices into that list: a rank that saw other files done must not write.
            todo = _digest(self.rows.paths)
            token, todo_0 = trainer.strategy.broadcast((self.rows.token, todo), src=0)
            if not trainer.strategy.reduce_boolean_decision(todo == todo_0, all=True):
                raise UserError("The processes found different images left to predict (an earlier run's "
                                "partial file changed as they started). Run the command again.")
            self.rows.token = token
            self.rows.open(trainer.global_rank)

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                               dataloader_idx=0):
            self.rows.write(*prediction)

        def teardown(self, trainer, pl_module, stage=None) -> None:
            self.rows.close()

    for cls in (ViewsPredictor, CsvRowWriter):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        _LIGHTNING_CLASSES[cls.__name__] = cls
    return _LIGHTNING_CLASSES


def __getattr__(name: str) -> Any:
    if name in ("ViewsPredictor", "CsvRowWriter"):
        return _lightning_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _digest(paths: Sequence[str]) -> str:
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


def prediction_loader(paths: Sequence[str], data_config: dict[str, Any], mode: str, batch_size: int,
                      rt: runtime.Runtime, max_pixels: int | None) -> torch.utils.data.DataLoader:
    """Images -> batches of ``(views [B, V, 3, H, W], index, errors)``, each file decoded once."""
    dataset = ViewsDataset(paths, CropViews(data_config, mode), data_config, max_pixels)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_views,
                                       persistent_workers=False, **rt.loader_kwargs())


def sharded(devices: str | int, strategy: str, rt: runtime.Runtime) -> bool:
    """Whether the inputs are split over several processes (Lightning's predict loop).

    A `ddp*` strategy over more than one device, or a strategy left to Lightning (`auto`) with more
    than one device (it picks DDP then), or a launcher (torchrun, srun) that started several processes.
    """
    strategy = str(strategy)
    if strategy == "auto":
        strategy = "ddp"
    if str(devices) == "-1":  # Lightning's "every GPU"
        devices = "auto"
    return runtime.processes_per_machine(devices, strategy, rt.device.type == "cuda") > 1


def single_device(rt: runtime.Runtime, devices: str | int) -> runtime.Runtime:
    """`rt` on the one GPU that `--devices` names by index (Lightning's "1," or [1]); else `rt` as is."""
    if rt.device.type == "cuda":
        ids = (list(devices) if isinstance(devices, (list, tuple))
               else [d for d in str(devices).split(",") if d.strip()] if "," in str(devices) else [])
        if len(ids) == 1 and str(ids[0]).strip().isdigit():
            return dataclasses.replace(rt, device=torch.device("cuda", int(ids[0])))
    return rt


def predict_rows(net: torch.nn.Module, loader: torch.utils.data.DataLoader, rows: RowWriter,
                 rt: runtime.Runtime, progress: bool = True) -> None:
    """One process: each batch through the network on the runtime's device and precision, into rows."""
    from tqdm.auto import tqdm

    rows.open(rank=0)
    # An ONNX Runtime session (`--runtime onnx`) is not a module: it has no device or mode to set.
    placed = runtime.evaluating_on(net, rt.device) if isinstance(net, torch.nn.Module) else contextlib.nullcontext()
    try:
        with placed, torch.inference_mode(), rt.autocast(), \
                tqdm(total=len(loader), desc="Predicting", unit="batch", disable=not progress) as bar:
            for views, index, errors in loader:
                probs, ood = score_views(net, views.to(rt.device, non_blocking=True), rows.rejection.scoring)
                rows.write(probs.float().cpu(), index, errors, ood.float().cpu())
                bar.update(1)
    finally:
        rows.close()


def predict_sharded(net: torch.nn.Module, loader: torch.utils.data.DataLoader, rows: RowWriter,
                    rt: runtime.Runtime, accelerator: str, devices: str | int, strategy: str,
                    progress: bool = True) -> tuple[int, int]:
    """Several processes: Lightning's predict loop, each rank writing its part through `rows`.

    Returns this process's global rank and the number of ranks, once every rank is done. On rank 0,
    `rows.token` names the partial files of every rank (the others take it from rank 0).
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import TQDMProgressBar

    classes = _lightning_classes()
    writer = classes["CsvRowWriter"](rows)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, precision=rt.precision,
                         callbacks=[writer, TQDMProgressBar(refresh_rate=1)] if progress else [writer],
                         enable_progress_bar=progress)
    net = net.cpu() if isinstance(net, torch.nn.Module) else net
    trainer.predict(classes["ViewsPredictor"](net, rows.rejection.scoring), dataloaders=loader,
                    return_predictions=False)
    trainer.strategy.barrier()
    return trainer.global_rank, trainer.world_size


def write_overlays(net: torch.nn.Module, spec: Any, rows: Any, paths: Sequence[str], folder: Path,
                   rt: runtime.Runtime, max_pixels: int | None) -> int:
    """`--explain`: each predicted image's Grad-CAM overlay for the label in its row; failed rows are skipped.

    `rows`: the output's rows (a DataFrame with `path`, `label`, `score`, `error`). Returns how many were written.
    """
    from finetune.data.images import ImageError, load_rgb
    from finetune.evaluation.explain import explain_image, overlay_names, titled

    folder.mkdir(parents=True, exist_ok=True)
    by_path = rows.set_index("path")
    written = 0
    with runtime.evaluating_on(net, rt.device):
        for path, name in zip(paths, overlay_names(paths)):
            row = by_path.loc[row_path(path)]
            if row["error"] or not row["label"]:
                continue
            try:
                img = load_rgb(path, max_pixels)
            except (ImageError, OSError) as e:  # changed since it was predicted
                log.warning("--explain: %s: %s", row_path(path), e)
                continue
            label = row["label"] if row["label"] in spec.class_names else row["top1_label"]  # "unknown": its class
            cam, _ = explain_image(net, img, spec.data_config, spec.class_names.index(label))
            titled(cam, f"{row['label']} {float(row['score']):.2f}").save(folder / name)
            written += 1
    return written


def done_rows(output: Path, cols: list[str], resume: bool):
    """With `resume`, `load_done`; otherwise no rows, earlier partial files left on disk for a later `--resume`."""
    if resume:
        return load_done(output, cols)
    import pandas as pd

    if left := partial_files(output):
        log.warning("%d partial file(s) of earlier runs beside %s left as they are: --resume would keep their rows",
                    len(left), output)
    return pd.DataFrame(columns=cols), []


def predict_to_file(model_uri: str, inputs: str | Sequence[str], output: str | Path, tta: str | None = None,
                    top_k: int = 3, batch_size: int = 32, num_workers: int | None = None, resume: bool = False,
                    accelerator: str = "auto", devices: str | int = 1, strategy: str = "auto",
                    max_pixels: int | None = None, progress: bool = True,
                    explain: str | Path | None = None, ood_threshold: float | None = None,
                    reject_unknown: bool = False, runtime_name: str | None = None) -> dict[str, Any]:
    """Predict every input image into `output`; returns counts (total, skipped as done, predicted).

    `explain`: a folder for the Grad-CAM overlay of each image predicted in this run. `ood_threshold`
    (None: the model's) decides `unknown`; `reject_unknown` writes ``unknown`` as the label of those images.
    `runtime_name`: torch, onnx or onnx-int8 (None: the model's "auto", ONNX Runtime when it carries a graph).
    """
    from finetune.tracking.pyfunc import load_logged_model

    # Device, precision (training's), torch threads vs loader workers: one decision for this process.
    rt = runtime.configure(accelerator, devices, strategy, workers=num_workers)
    output = Path(output)
    output_format(output)
    if not output.parent.is_dir():
        raise UserError(f"Output folder {output.parent} does not exist.")
    paths = list_inputs(inputs) if isinstance(inputs, (str, Path)) else list(inputs)
    model = load_logged_model(model_uri, {"runtime": runtime_name} if runtime_name else None)
    net, spec = model.predictor, model.spec
    mode = tta or model.default_tta
    if mode not in TTA_VIEWS:
        raise UserError(f"Invalid tta {mode!r}. Valid values: {', '.join(TTA_VIEWS)}.")
    if explain:
        from finetune.evaluation.explain import check_explainable

        check_explainable(model.net)
    top_k = max(1, min(top_k, len(spec.class_names)))
    cols = columns(top_k)
    done, earlier = done_rows(output, cols, resume)
    done_paths = set(done["path"])
    todo = [p for p in paths if row_path(p) not in done_paths]
    log.info("%d images, %d already in the output, %d to predict (tta %s)", len(paths), len(paths) - len(todo),
             len(todo), mode)

    loader = prediction_loader(todo, spec.data_config, mode, batch_size, rt, max_pixels or model.max_pixels)
    rejection = Rejection(model.scoring, model.ood_threshold if ood_threshold is None else ood_threshold,
                          reject_unknown or model.reject_unknown)
    rows = RowWriter(output, todo, spec.class_names, top_k, rejection)
    rank, world_size = 0, 1
    if todo and sharded(devices, strategy, rt):
        rank, world_size = predict_sharded(net, loader, rows, rt, accelerator, devices, strategy, progress)
    elif todo:
        predict_rows(net, loader, rows, single_device(rt, devices), progress)
    if rank == 0:
        parts = [partial_path(output, rows.token, r) for r in range(world_size)]
        # Rows of earlier runs' partial files (`earlier`) are in `done`; only this run's files are new.
        finalize(output, done, cols, [p for p in parts if p.exists()] if todo else [], earlier)
        if explain and todo:
            write_overlays(model.net, spec, read_output(output), todo, Path(explain), rt,
                           max_pixels or model.max_pixels)
    return {"total": len(paths), "already_done": len(paths) - len(todo), "predicted": len(todo),
            "output": str(output), "tta": mode}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model-uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model.")
@click.option("--input", "inputs", required=True, type=click.Path(exists=True),
              help="A folder (searched recursively), a .csv with a 'path' column, or a text file of paths.")
@prediction_options
def main(model_uri: str, inputs: str, **options: Any) -> None:
    """Predict labels for every image of a folder or list into a CSV or Parquet file (as `finetune predict`)."""
    console.setup()
    run_prediction(model_uri, inputs, options)


if __name__ == "__main__":
    main(sys.argv[1:])
