"""Bad configuration: a clear one-line error and exit code 2, before any work is done."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from finetune.cli import cli
from tests.conftest import tiny_train_args


def _refused(args: list[str], tmp_path: Path, uri: str | None = None):
    """Run the CLI; assert exit code 2, no traceback, and that no output or MLflow run was made."""
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()
    if uri:
        assert not MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    return errors[0]


def test_unknown_model_suggests_close_names(image_folder: Path, tmp_path: Path, isolated_mlflow: str):
    args = tiny_train_args(image_folder, tmp_path / "out")
    args[args.index("--model") + 1] = "resnet5O"
    line = _refused(args, tmp_path, isolated_mlflow)
    assert line.startswith("Error: Unknown timm model 'resnet5O'. Did you mean: ")
    assert "resnet50" in line


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "Error: Invalid value for '--epochs': 0 is not in the range x>=1."),
    ("--val-fraction", "1.5", "Error: Invalid value for '--val-fraction': 1.5 is not in the range 0.0<x<1.0."),
    ("--val-fraction", "0", "Error: Invalid value for '--val-fraction': 0.0 is not in the range 0.0<x<1.0."),
    ("--batch-size", "64", "Error: batch_size 64 is larger than the training split (12 images). "
                           "Use --batch-size 12 or less."),
    ("--strategy", "dpp", "Error: Invalid --accelerator/--devices/--strategy/--precision (cpu/auto/dpp/32-true): "
                          "You selected an invalid strategy name: `strategy='dpp'`."),
    ("--precision", "99", "Error: Invalid --accelerator/--devices/--strategy/--precision (cpu/auto/auto/99): "
                          "Precision '99' is invalid."),
    ("--accelerator", "tpux", "Error: Invalid --accelerator/--devices/--strategy/--precision "
                              "(tpux/auto/auto/32-true): You selected an invalid accelerator name"),
])
def test_impossible_and_unknown_values(flag: str, value: str, message: str, image_folder: Path, tmp_path: Path,
                                       isolated_mlflow: str):
    args = tiny_train_args(image_folder, tmp_path / "out", "--accelerator", "cpu", flag, value)
    assert _refused(args, tmp_path, isolated_mlflow).startswith(message)


@pytest.mark.parametrize("flag, value, message", [
    ("--tta", "11crop", "Invalid value for '--tta': '11crop' is not one of"),
    ("--scenario", "huge", "Invalid value for '--scenario': 'huge' is not one of"),
    ("--epochs", "ten", "Invalid value for '--epochs': 'ten' is not a valid integer"),
    ("--epoch", "3", "No such option '--epoch'."),
])
def test_unknown_option_values_on_the_command_line(flag: str, value: str, message: str, image_folder: Path,
                                                   tmp_path: Path):
    assert message in _refused(tiny_train_args(image_folder, tmp_path / "out", flag, value), tmp_path)


@pytest.mark.parametrize("yaml_text, message", [
    ("tta: 11crop\n", "Error: Invalid tta '11crop'. Valid values: auto, none, center, 5crop, 10crop."),
    ("epochz: 3\n", "Error: Unknown config key(s): epochz. Valid keys: data_dir, val_fraction,"),
    ("lr: fast\n", "Error: Config value lr='fast' is not a valid float (a finite number)."),
    ("lr: 0\n", "Error: lr must be > 0 (got 0.0)."),
    ("label_smoothing: 1.5\n", "Error: label_smoothing must be in [0, 1) (got 1.5)."),
    ("- a list\n", "Error: Config file config.yaml must hold a mapping of option: value, not list."),
])
def test_unknown_values_in_the_config_file(yaml_text: str, message: str, image_folder: Path, tmp_path: Path):
    Path("config.yaml").write_text(yaml_text)
    args = tiny_train_args(image_folder, tmp_path / "out", "--config", "config.yaml")
    assert _refused(args, tmp_path).startswith(message)


def test_unreachable_tracking_server_fails_fast(image_folder: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.monotonic()
    line = _refused(tiny_train_args(image_folder, tmp_path / "out"), tmp_path)
    # MLflow's client would retry for minutes; one short request decides. A generous bound: this
    # checks "no retry loop", not speed.
    assert time.monotonic() - started < 60
    assert line.startswith("Error: Cannot reach the MLflow tracking server at http://127.0.0.1:9 (ConnectionError")
    assert line.endswith("Start the server or fix MLFLOW_TRACKING_URI (unset it to use ./mlruns).")


def test_a_tracking_store_mlflow_refuses_is_one_message_before_any_work(image_folder: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "filestore").as_uri())  # MLflow 3: file stores are read-only
    line = _refused(tiny_train_args(image_folder, tmp_path / "out"), tmp_path)
    assert line.startswith(f"Error: MLflow cannot use the tracking store {(tmp_path / 'filestore').as_uri()} (")
    assert line.endswith("or unset it to use ./mlruns.")
    assert not (tmp_path / "out").exists()  # refused before the scan, the measurement or an output folder
