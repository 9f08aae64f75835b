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
done. `--resume` keeps rows already in the output or left in partial files by an interrupted run,
and predicts only the rest.

Sharded: `--devices N --strategy ddp` runs one process per device through Lightning's predict loop
(imported only then: loading and running a model in one process never imports Lightning); Lightning
gives each rank a disjoint part of the inputs, each rank writes its own partial file through the same
row writer, and rank 0 merges them.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import click
import torch

from finetune import console
from finetune import runtime
from finetune.data.folders import iter_image_files
from finetune.errors import UserError
from finetune.data.crops import TTA_VIEWS, CropViews, ViewsDataset, collate_views
from finetune.evaluation.tta import score_views
from finetune.model.scoring import UNKNOWN_LABEL, Scoring

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


def output_format(output: Path) -> str:
    fmt = FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise UserError(f"Output {output} must end in {', '.join(FORMATS)} (CSV or Parquet).")
    return fmt


def partial_files(output: Path) -> list[str]:
    return sorted(glob.glob(str(output.parent / f".{output.name}.partial*.csv")))


def _read_partial(path: str) -> list[list[str]]:
    """Rows of a partial CSV; a last line cut short by a crash is dropped."""
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    return list(csv.reader(text.splitlines()))


def load_done(output: Path, cols: list[str]):
    """Rows already predicted (the output and any partial files) as a DataFrame, one per path."""
    import pandas as pd

    frames = []
    if output.exists():
        frame = (pd.read_csv(output, dtype=str, keep_default_na=False) if output_format(output) == "csv"
                 else pd.read_parquet(output).astype(str).replace({"nan": "", "None": ""}))
        frames.append(frame)
    for path in partial_files(output):
        rows = _read_partial(path)
        if rows:
            frames.append(pd.DataFrame(rows[1:], columns=rows[0]))
    for frame in frames:
        if list(frame.columns) != cols:
            raise UserError(f"{output} (or its partial file) has columns {list(frame.columns)}, but this run "
                            f"writes {cols}. Use the same --top-k as before, or drop --resume.")
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames, ignore_index=True).drop_duplicates("path", keep="last")


def partial_path(output: Path, rank: int) -> Path:
    """The partial CSV that process `rank` of a run appends its rows to."""
    return output.parent / f".{output.name}.partial.rank{rank}.csv"


class RowWriter:
    """Appends each batch's rows to one process's partial CSV, flushed, so a crash loses one batch at most.

    The only code that turns predictions into rows: the plain loop and Lightning's (sharded) predict
    loop both hand it ``(probs [B, K], index [B], errors)`` per batch.
    """

    def __init__(self, output: Path, paths: Sequence[str], class_names: list[str], top_k: int,
                 rejection: Rejection | None = None):
        self.output, self.paths, self.class_names, self.top_k = output, paths, class_names, top_k
        self.rejection = rejection or Rejection(Scoring())
        self.file = None
        self.writer = None

    def open(self, rank: int = 0) -> None:
        self.path = partial_path(self.output, rank)
        self.file = open(self.path, "w", newline="", encoding="utf-8", errors="surrogateescape")
        self.writer = csv.writer(self.file)
        self.writer.writerow(columns(self.top_k))
        self.file.flush()

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

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
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
        """`RowWriter` as a Lightning prediction writer: each rank writes its own partial file."""

        def __init__(self, output: Path, paths: Sequence[str], class_names: list[str], top_k: int,
                     rejection: Rejection):
            super().__init__(write_interval="batch")
            self.rows = RowWriter(output, paths, class_names, top_k, rejection)

        def setup(self, trainer, pl_module, stage=None) -> None:
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


def _arrow_schema(cols: list[str]):
    import pyarrow as pa

    return pa.schema([(c, pa.float64() if c == "score" or c.endswith("_score") else pa.string()) for c in cols])


def finalize(output: Path, done, cols: list[str], new_parts: list[Path]) -> None:
    """Write done rows + new partial rows to a temp file, then rename it to the output."""
    tmp = output.parent / f".{output.name}.tmp"
    if output_format(output) == "csv":
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            done.to_csv(f, index=False, columns=cols)
            for part in new_parts:
                with open(part, encoding="utf-8", errors="surrogateescape") as src:
                    next(src, None)  # header
                    for line in src:
                        f.write(line)
    else:
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
    os.replace(tmp, output)
    for path in partial_files(output):
        os.remove(path)


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

    Returns this process's global rank and the number of ranks, once every rank is done.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import TQDMProgressBar

    classes = _lightning_classes()
    writer = classes["CsvRowWriter"](rows.output, rows.paths, rows.class_names, rows.top_k, rows.rejection)
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
    if resume:
        done = load_done(output, cols)
    else:
        import pandas as pd

        done = pd.DataFrame(columns=cols)
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
        parts = [partial_path(output, r) for r in range(world_size)]
        # Partial files of earlier runs are already in `done`; only this run's are new.
        finalize(output, done, cols, [p for p in parts if p.exists()] if todo else [])
        if explain and todo:
            write_overlays(model.net, spec, load_done(output, cols), todo, Path(explain), rt,
                           max_pixels or model.max_pixels)
    return {"total": len(paths), "already_done": len(paths) - len(todo), "predicted": len(todo),
            "output": str(output), "tta": mode}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model-uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model.")
@click.option("--input", "inputs", required=True, type=click.Path(exists=True),
              help="A folder (searched recursively), a .csv with a 'path' column, or a text file of paths.")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="Output file: .csv or .parquet.")
@click.option("--tta", type=click.Choice(list(TTA_VIEWS)), help="Test-time crops (default: the model's).")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1),
              help="How many top classes to write per image.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--num-workers", type=click.IntRange(min=0), help="Data loader workers (default: from the cores).")
@click.option("--resume", is_flag=True, help="Keep rows already in the output (or left by an interrupted "
              "run) and predict only the other images.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), help="Refuse images with more pixels than this.")
@click.option("--accelerator", default="auto", show_default=True, help="auto, cpu or gpu.")
@click.option("--devices", default="1", show_default=True, help="Devices (processes with --strategy ddp).")
@click.option("--strategy", default="auto", show_default=True,
              help="ddp (with --devices N) shards the inputs over N processes (Lightning).")
@click.option("--explain", type=click.Path(file_okay=False),
              help="Also write each predicted image's Grad-CAM overlay (<stem>_cam.png) into this folder.")
@click.option("--reject-unknown", is_flag=True,
              help="Write 'unknown' as the label of images the model flags unknown (default: keep the label).")
@click.option("--runtime", "runtime_name", type=click.Choice(["auto", "torch", "onnx", "onnx-int8"]),
              help="torch, or ONNX Runtime (the ONNX version `finetune export --register` registers); default auto: "
                   "ONNX Runtime when the model carries an ONNX graph.")
@click.option("--ood-threshold", type=float,
              help="Unknown-score threshold (default: the model's, which keeps 95% of held-out training images).")
def main(model_uri: str, inputs: str, output: str, tta: str | None, top_k: int, batch_size: int,
         num_workers: int | None, resume: bool, max_image_pixels: int | None, accelerator: str, devices: str,
         strategy: str, explain: str | None, reject_unknown: bool, runtime_name: str | None,
         ood_threshold: float | None) -> None:
    """Predict labels for every image of a folder or list into a CSV or Parquet file."""
    console.setup()
    result = predict_to_file(model_uri, inputs, output, tta, top_k, batch_size, num_workers, resume,
                             accelerator, int(devices) if devices.isdigit() else devices, strategy,
                             max_image_pixels, explain=explain, ood_threshold=ood_threshold,
                             reject_unknown=reject_unknown, runtime_name=runtime_name)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        click.echo(f"{result['predicted']} predicted, {result['already_done']} kept from before, "
                   f"{result['total']} rows in {result['output']}", err=False)


if __name__ == "__main__":
    main(sys.argv[1:])
