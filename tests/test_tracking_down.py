"""The MLflow store going away mid-run: training finishes, keeps everything locally, uploads later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from finetune.cli import cli
from finetune.training.module import Classifier
from tests.conftest import tiny_train_args


def test_store_down_mid_run_keeps_results_and_upload_sends_them_later(
        image_folder: Path, tmp_path: Path, isolated_mlflow: str, monkeypatch: pytest.MonkeyPatch):
    down = {"now": False}

    def failing(name):
        original = getattr(MlflowClient, name)

        def call(self, *args, **kwargs):
            if down["now"]:
                raise ConnectionError(f"store down ({name})")
            return original(self, *args, **kwargs)
        return call

    for name in ("log_batch", "log_metric", "log_artifact", "log_artifacts", "set_terminated", "get_run",
                 "update_run"):
        monkeypatch.setattr(MlflowClient, name, failing(name))
    first_step = Classifier.training_step

    def step_then_outage(self, batch, batch_idx):
        down["now"] = True  # the store disappears once training has started
        return first_step(self, batch, batch_idx)

    monkeypatch.setattr(Classifier, "training_step", step_then_outage)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, tiny_train_args(out.parent / "data", out, "--epochs", "2"))
    assert r.exit_code == 0, r.output
    assert f"MLflow was unreachable; not yet logged: {out / 'mlflow_pending.json'}" in r.output
    assert f"finetune upload {out}" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    pending = json.loads((out / "mlflow_pending.json").read_text())
    assert pending["run_id"] == summary["mlflow_run_id"] and "store down" in pending["error"]
    assert {"epoch", "train_acc", "train_loss", "select_acc", "select_acc_top5", "select_loss"} <= {
        m["key"] for m in pending["metrics"]}
    assert pending["finish"] == ["final_metrics", "model_files", "summary", "terminate"]

    down["now"] = False  # the store is back
    r = CliRunner().invoke(cli, ["upload", str(out)])
    assert r.exit_code == 0, r.output
    client = MlflowClient(isolated_mlflow)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "select_acc")) == 2
    assert run.data.metrics["final_val_acc"] == summary["metrics"]["val_acc"]
    assert {"summary.json", "model_files"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (out / "mlflow_pending.json").exists()
    r = CliRunner().invoke(cli, ["upload", str(out)])
    assert r.exit_code == 2 and "Nothing to upload" in r.output
