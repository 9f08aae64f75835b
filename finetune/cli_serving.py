"""`finetune predict` and `finetune serve`: using a trained model, as commands of the finetune CLI.

The work is in `serve/` (batch prediction, the REST server); these commands only parse. Their options are
declared once, in `serve.options`, which `python -m serve.batch_predict` uses too.
"""

from __future__ import annotations

from typing import Any

import click

from serve.options import RUNTIMES, prediction_options, run_prediction


@click.command()
@click.argument("model_uri")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True, type=click.Path(exists=True))
@prediction_options
def predict(model_uri: str, inputs: tuple[str, ...], **options: Any) -> None:
    """Predict a label for every image of INPUT... with MODEL_URI, into one CSV or Parquet file (-o).

    MODEL_URI: runs:/RUN_ID/model, models:/NAME/VERSION or models:/NAME@ALIAS. Each INPUT is a folder
    (searched recursively), a .csv with a 'path' column, a text file with one path per line, or an image.
    One row per image: path, label, score, top-k labels and scores, ood_score, unknown, and error (an
    unreadable file gets a row with the error and no label; it never stops the run).
    """
    from serve.batch_predict import list_sources

    run_prediction(model_uri, list_sources(inputs), options)


@click.command()
@click.argument("model_uri")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; put authentication in front of it).")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--path-root", type=click.Path(exists=True, file_okay=False),
              help="The only folder a request's 'path' column may read images from (default: 'path' is refused).")
@click.option("--max-image-pixels", type=click.IntRange(min=1),
              help="Refuse larger images before decoding them (default: the model's, at most 40 million).")
@click.option("--runtime", "runtime_name", type=click.Choice(RUNTIMES),
              help="torch, or ONNX Runtime (default auto: ONNX Runtime when the model carries an ONNX graph).")
def serve(model_uri: str, host: str, port: int, path_root: str | None, max_image_pixels: int | None,
          runtime_name: str | None) -> None:
    """Serve MODEL_URI over HTTP: POST /invocations, GET /ping (`mlflow models serve`).

    A request is JSON: {"dataframe_split": {"columns": ["image"], "data": [[BASE64_IMAGE], ...]}} (or
    "dataframe_records"), with optional "params": {"tta": ..., "top_k": ...}. Each answer row has label,
    score, top_labels, top_scores, probabilities, ood_score and unknown. Rows and bytes per request are
    bounded by FINETUNE_MAX_REQUEST_ROWS and FINETUNE_MAX_REQUEST_BYTES (environment).
    """
    from serve.rest import ServeOptions, serve as start

    start(model_uri, ServeOptions(host=host, port=port, path_root=path_root, max_image_pixels=max_image_pixels,
                                  runtime=runtime_name))
