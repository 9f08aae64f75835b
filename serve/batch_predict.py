"""Batch prediction with a logged or registered model over a folder or a list of image paths.

    python -m serve.batch_predict --model-uri models:/NAME@champion --input DIR_OR_LIST --output preds.csv

One output row per input image: `path`, `label`, `score`, `top{i}_label`/`top{i}_score` and
`error` (unreadable files get a row with the error filled and no label; they never stop the run).
Images stream through a DataLoader into a plain forward loop on this process's device (at
training's precision); each batch's rows are appended to a partial CSV next to the output (serve/rows.py), so
memory stays flat, and the output (CSV or Parquet, by extension) appears by rename only when everything is
done. `--resume` keeps rows already in the output or left in partial files by interrupted runs,
and predicts only the rest.

Sharded: `--devices N --strategy ddp` runs one process per device through Lightning's predict loop
(imported only then: loading and running a model in one process never imports Lightning); Lightning
gives each rank a disjoint part of the inputs, each rank writes its own partial file through the same
row writer (rank 0's token, broadcast, names the files of all ranks), and rank 0 merges them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import click
import torch

from finetune import console, runtime
from finetune.data.crops import TTA_VIEWS, CropViews, ViewsDataset, collate_views
from finetune.data.folders import iter_image_files
from finetune.data.images import IMAGE_EXTENSIONS
from finetune.errors import UserError
from finetune.evaluation.tta import score_views
from finetune.model.scoring import Scoring
from serve.options import PredictOptions, prediction_options, run_prediction
from serve.rows import (Rejection, RowWriter, columns, digest, done_rows, finalize, output_format, partial_path,
                        read_output, row_path)

log = logging.getLogger("serve.batch_predict")


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
            todo = digest(self.rows.paths)
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
                    rt: runtime.Runtime, opts: PredictOptions) -> tuple[int, int]:
    """Several processes: Lightning's predict loop, each rank writing its part through `rows`.

    Returns this process's global rank and the number of ranks, once every rank is done. On rank 0,
    `rows.token` names the partial files of every rank (the others take it from rank 0).
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import TQDMProgressBar

    classes = _lightning_classes()
    writer = classes["CsvRowWriter"](rows)
    progress = opts.progress
    trainer = pl.Trainer(accelerator=opts.accelerator, devices=opts.devices, strategy=opts.strategy, logger=False,
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


def predict_to_file(model_uri: str, inputs: str | Sequence[str], output: str | Path, **options: Any) -> dict[str, Any]:
    """`predict` with the options as keywords (`PredictOptions`' fields)."""
    return predict(model_uri, inputs, PredictOptions(output=str(output), **options))


def predict(model_uri: str, inputs: str | Sequence[str], opts: PredictOptions) -> dict[str, Any]:
    """Predict every input image into `opts.output`; returns counts (total, skipped as done, predicted).

    `opts.explain`: a folder for the Grad-CAM overlay of each image predicted in this run. `opts.ood_threshold`
    (None: the model's) decides `unknown`; `opts.reject_unknown` writes ``unknown`` as the label of those images.
    `opts.runtime_name`: torch, onnx or onnx-int8 (None: the model's "auto", ONNX Runtime when it carries a graph).
    """
    from finetune.tracking.pyfunc import load_logged_model

    # Device, precision (training's), torch threads vs loader workers: one decision for this process.
    rt = runtime.configure(opts.accelerator, opts.devices, opts.strategy, workers=opts.num_workers)
    output = Path(opts.output)
    output_format(output)
    if not output.parent.is_dir():
        raise UserError(f"Output folder {output.parent} does not exist.")
    paths = list_inputs(inputs) if isinstance(inputs, (str, Path)) else list(inputs)
    model = load_logged_model(model_uri, {"runtime": opts.runtime_name} if opts.runtime_name else None)
    mode = opts.tta or model.default_tta
    if mode not in TTA_VIEWS:
        raise UserError(f"Invalid tta {mode!r}. Valid values: {', '.join(TTA_VIEWS)}.")
    if model.scoring.multi_label and (opts.explain or opts.reject_unknown or opts.ood_threshold is not None):
        raise UserError("This model answers with several labels per image: --explain, --reject-unknown and "
                        "--ood-threshold work with one-label models only. Leave them out.")
    if opts.explain:
        from finetune.evaluation.explain import check_explainable

        check_explainable(model.net)
    top_k = max(1, min(opts.top_k, len(model.spec.class_names)))
    cols = columns(top_k, model.scoring.multi_label)
    done, earlier = done_rows(output, cols, opts.resume)
    done_paths = set(done["path"])
    todo = [p for p in paths if row_path(p) not in done_paths]
    log.info("%d images, %d already in the output, %d to predict (tta %s)", len(paths), len(paths) - len(todo),
             len(todo), mode)
    rank, world_size, token = predict_todo(model, todo, output, top_k, mode, rt, opts)
    if rank == 0:
        parts = [partial_path(output, token, r) for r in range(world_size)]
        # Rows of earlier runs' partial files (`earlier`) are in `done`; only this run's files are new.
        finalize(output, done, cols, [p for p in parts if p.exists()] if todo else [], earlier)
        if opts.explain and todo:
            write_overlays(model.net, model.spec, read_output(output), todo, Path(opts.explain), rt,
                           opts.max_pixels or model.max_pixels)
    return {"total": len(paths), "already_done": len(paths) - len(todo), "predicted": len(todo),
            "output": str(output), "tta": mode}


def predict_todo(model: Any, todo: list[str], output: Path, top_k: int, mode: str, rt: runtime.Runtime,
                 opts: PredictOptions) -> tuple[int, int, str]:
    """The images left, through the model into this run's partial files (one process, or sharded).

    Returns this process's rank, the number of ranks and the run's token (which names the partial files)."""
    rejection = Rejection(model.scoring, model.ood_threshold if opts.ood_threshold is None else opts.ood_threshold,
                          opts.reject_unknown or model.reject_unknown)
    rows = RowWriter(output, todo, model.spec.class_names, top_k, rejection)
    if not todo:
        return 0, 1, rows.token
    loader = prediction_loader(todo, model.spec.data_config, mode, opts.batch_size, rt,
                               opts.max_pixels or model.max_pixels)
    if sharded(opts.devices, opts.strategy, rt):
        rank, world_size = predict_sharded(model.predictor, loader, rows, rt, opts)
        return rank, world_size, rows.token
    predict_rows(model.predictor, loader, rows, single_device(rt, opts.devices), opts.progress)
    return 0, 1, rows.token


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

