"""The verbs that use a trained model (`predict`, `serve`), what `train` ends with, `--version` and `-v` anywhere."""

from __future__ import annotations

import dataclasses

import importlib.metadata
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import serve.rest
from finetune.cli import cli
from finetune.tracking import registry
from serve.batch_predict import main as batch_main
from serve.options import PredictOptions
from tests.conftest import make_folder, tiny_train_args
from tests.model_helpers import logged_model


def test_version_comes_from_the_installed_package():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"finetune {importlib.metadata.version('finetune')}"


@pytest.mark.parametrize("args", [["-v", "promote", "m", "1"], ["promote", "m", "1", "-v"],
                                  ["promote", "--verbose", "m", "1"]])
def test_verbose_is_accepted_before_or_after_the_command(args, monkeypatch):
    import finetune.cli

    seen = []
    monkeypatch.setattr(finetune.cli.console, "setup", seen.append)
    result = CliRunner().invoke(cli, args)
    assert "No such option" not in result.output and seen == [True]
    assert result.exit_code == 2 and "Traceback" not in result.output  # no registered model "m": a UserError


def _option_names(command) -> dict[str, tuple]:
    return {p.name: (tuple(p.opts), p.default, p.help) for p in command.params if p.name not in ("model_uri", "inputs")}


def test_predict_takes_exactly_the_options_of_batch_predict():
    from finetune.cli_serving import predict

    ours, theirs = _option_names(predict), _option_names(batch_main)
    assert ours == theirs
    # Both are generated from PredictOptions: each of its option fields is one click option, and nothing else.
    assert set(ours) == {f.name for f in dataclasses.fields(PredictOptions) if f.metadata}
    assert {"tta", "top_k", "batch_size", "num_workers", "resume", "max_pixels", "accelerator", "devices",
            "strategy", "explain", "reject_unknown", "runtime_name", "ood_threshold", "output"} <= set(ours)
    assert ours["output"][0] == ("--output", "-o")
    assert ours["max_pixels"][0] == ("--max-image-pixels",) and ours["runtime_name"][0] == ("--runtime",)
    assert ours["top_k"][1] == PredictOptions.top_k


def test_predict_reads_folders_lists_and_image_files_into_one_output(tmp_path: Path):
    uri = logged_model(tmp_path)
    a, b = make_folder(tmp_path / "a", per_class=2), make_folder(tmp_path / "b", classes=("bird",), per_class=2)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{b / 'bird' / 'bird_0.png'}\n")
    single = a / "cat" / "cat_0.png"  # also in folder a: one row
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(cli, ["predict", uri, str(a), str(listing), str(single), "-o", str(out),
                                      "--top-k", "1", "--num-workers", "0", "--tta", "center"])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out)
    assert sorted(Path(p).name for p in rows["path"]) == ["bird_0.png", "cat_0.png", "cat_1.png", "dog_0.png",
                                                          "dog_1.png"]
    assert list(rows.columns[:5]) == ["path", "label", "score", "top1_label", "top1_score"]
    assert set(rows["label"]) <= {"cat", "dog"} and "5 predicted, 0 kept from before, 5 rows" in result.output


def test_predict_errors_are_one_line(tmp_path: Path):
    folder = make_folder(tmp_path / "a", per_class=1)
    missing = CliRunner().invoke(cli, ["predict", "runs:/0123/model", str(folder), "-o", str(tmp_path / "p.csv")])
    assert missing.exit_code == 2 and "Cannot load model" in missing.output and "Traceback" not in missing.output
    no_output = CliRunner().invoke(cli, ["predict", "runs:/0123/model", str(folder)])
    assert no_output.exit_code == 2 and "Missing option '--output' / '-o'" in no_output.output


@pytest.fixture
def exec_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(serve.rest.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    return calls


def test_serve_checks_the_model_then_execs_mlflow_models_serve(tmp_path: Path, exec_calls, isolated_mlflow: str):
    registry.register(logged_model(tmp_path), "pets", {})
    root = tmp_path / "images"
    root.mkdir()
    result = CliRunner().invoke(cli, ["serve", "models:/pets/1", "--port", "5123", "--host", "0.0.0.0",
                                      "--path-root", str(root), "--max-image-pixels", "1000", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    [(path, argv, env)] = exec_calls
    assert path == argv[0] and Path(path).name == "mlflow" and os.access(path, os.X_OK)
    assert Path(path).parent == Path(sys.executable).parent  # this environment's mlflow
    assert argv[1:] == ["models", "serve", "-m", "models:/pets/1", "--env-manager", "local", "-h", "0.0.0.0",
                        "-p", "5123"]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # uvicorn is found there
    assert env["MLFLOW_TRACKING_URI"] == isolated_mlflow
    assert env["FINETUNE_PATH_ROOT"] == str(root.resolve()) and env["FINETUNE_MAX_IMAGE_PIXELS"] == "1000"
    assert env["FINETUNE_RUNTIME"] == "torch"


def test_serve_leaves_unset_settings_to_the_model(tmp_path: Path, exec_calls, monkeypatch):
    monkeypatch.delenv("FINETUNE_PATH_ROOT", raising=False)
    uri = logged_model(tmp_path)
    assert CliRunner().invoke(cli, ["serve", uri]).exit_code == 0
    [(_, argv, env)] = exec_calls
    assert argv[-4:] == ["-h", "127.0.0.1", "-p", "5000"]
    assert not {"FINETUNE_PATH_ROOT", "FINETUNE_MAX_IMAGE_PIXELS", "FINETUNE_RUNTIME"} & set(env)


def test_serve_refuses_a_model_it_cannot_load_before_starting(tmp_path: Path, exec_calls):
    result = CliRunner().invoke(cli, ["serve", "models:/nothing/1"])
    assert result.exit_code == 2 and "Cannot load model 'models:/nothing/1'" in result.output
    assert "Traceback" not in result.output and exec_calls == []


@pytest.mark.slow
def test_finetune_serve_answers_a_prediction(tmp_path: Path, isolated_mlflow: str):
    from tests.test_rest import b64_png, free_port, post, started_server

    registry.register(logged_model(tmp_path), "served", {})
    port = free_port()
    finetune_cli = str(Path(sys.executable).with_name("finetune"))
    command = [finetune_cli, "serve", "models:/served@champion", "--port", str(port)]
    with started_server(tmp_path, command, port, {"MLFLOW_TRACKING_URI": isolated_mlflow}) as (base, _):
        status, body = post(f"{base}/invocations", {"dataframe_records": [{"image": b64_png((220, 40, 40))}]})
        assert status == 200, body
        assert body["predictions"][0]["label"] in ("cat", "dog")


def test_train_ends_with_the_model_uri_and_commands_to_paste(image_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, tiny_train_args(image_folder, out, "--register", "pets"))
    assert result.exit_code == 0, result.output
    run_id = json.loads((out / "summary.json").read_text())["mlflow_run_id"]
    assert result.output.rstrip().splitlines()[-6:] == [
        f"Model URI:  runs:/{run_id}/model",
        "Registered: models:/pets/1",
        "Next:",
        f"  finetune evaluate models:/pets/1 {image_folder}",
        "  finetune predict models:/pets/1 ./new-images -o predictions.csv",
        "  finetune serve models:/pets/1"]
    # The URIs printed are ones the commands take.
    predicted = CliRunner().invoke(cli, ["predict", f"runs:/{run_id}/model", str(image_folder / "cat"), "-o",
                                         str(tmp_path / "p.csv"), "--num-workers", "0"])
    assert predicted.exit_code == 0, predicted.output
