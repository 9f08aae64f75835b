"""End-to-end training through the CLI, and what the MLflow run holds."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from finetune.cli import cli
from tests.conftest import tiny_train_args


def test_train_end_to_end_logs_run(image_folder: Path, tmp_path: Path, isolated_mlflow: str):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, tiny_train_args(image_folder, out, "--epochs", "2", "--experiment", "e2e"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["metrics"]["val_acc"] <= 1.0
    assert summary["classes"] == ["cat", "dog"]

    client = MlflowClient(isolated_mlflow)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["config.model"] == "test_resnet"
    assert params["weights_source"] == "none"
    assert params["data.train"] == str(summary["data"]["train"])
    assert params["data.classes"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert len(history) == 2  # one point per epoch
    for metric in ("train_loss", "train_acc", "val_loss", "val_acc_top5"):
        assert client.get_metric_history(run.info.run_id, metric), metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "classes.json", "skipped_files.json", "summary.json", "model_files"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model_files")}
    assert {"model_files/model.safetensors", "model_files/model.json"} <= model_files
