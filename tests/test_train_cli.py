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
    m = summary["metrics"]
    assert 0.0 <= m["val_acc_ci95_low"] <= m["val_acc"] <= m["val_acc_ci95_high"] <= 1.0
    assert m["val_acc_ci95_high"] - m["val_acc_ci95_low"] > 0.1  # a few dozen val images: a wide interval
    assert (f"accuracy {m['val_acc']:.4f} (95% interval {m['val_acc_ci95_low']:.3f}-{m['val_acc_ci95_high']:.3f}; "
            f"{summary['data']['val']} images") in result.output
    assert summary["classes"] == ["cat", "dog"]

    client = MlflowClient(isolated_mlflow)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["config.model"] == "test_resnet"
    assert params["weights_source"] == "none"
    assert params["data.train"] == str(summary["data"]["train"])
    assert params["data.classes"] == "2"
    history = client.get_metric_history(run.info.run_id, "select_acc")
    assert len(history) == 2  # one point per epoch, on the selection split carved from train
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 1  # val: read once, at the end
    assert len(client.get_metric_history(run.info.run_id, "val_acc_ci95_low")) == 1
    for metric in ("train_loss", "train_acc", "select_loss", "select_acc_top5"):
        assert client.get_metric_history(run.info.run_id, metric), metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "classes.json", "skipped_files.json", "summary.json", "model_files"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model_files")}
    assert {"model_files/model.safetensors", "model_files/model.json"} <= model_files


def test_large_plan_validates_the_warmed_up_head_beside_the_fine_tuned_network(image_folder: Path, tmp_path: Path,
                                                                               isolated_mlflow: str,
                                                                               weights_file: Path):
    out = tmp_path / "out"
    args = tiny_train_args(image_folder, out, "--scenario", "large-similar")
    args[args.index("--weights") + 1] = str(weights_file)  # pretrained: random features get no head warm-up
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "summary.json").read_text())["metrics"]
    assert m["select_acc"] == max(m["select_acc_finetuned"], m["select_acc_warmup"])
    assert (m["weights"] == "warmup") == (m["select_acc_warmup"] > m["select_acc_finetuned"])


def test_warmed_up_head_is_kept_only_when_it_scored_better():
    import torch
    from torch import nn

    from finetune.training.network_plans import _keep_warmup_if_better

    class Holder(nn.Module):
        def __init__(self, value: float):
            super().__init__()
            self.net = nn.Linear(1, 1, bias=False)
            nn.init.constant_(self.net.weight, value)

    for tuned, warm in ((0.5, 0.75), (0.75, 0.5)):  # exact in float32
        module = Holder(tuned)
        warm_state = {"weight": torch.full((1, 1), warm)}
        warm_scores = {"select_acc": warm, "select_loss": 1.0 - warm, "select_acc_top5": 1.0}
        metrics = _keep_warmup_if_better(module, warm_state, warm_scores,
                                         {"select_acc": tuned, "select_loss": 0.1, "select_acc_top5": 1.0, "weights": "raw"})
        kept = max(tuned, warm)
        assert float(module.net.weight) == kept  # the network left in place is the one reported
        assert metrics["select_acc"] == kept and metrics["select_acc_finetuned"] == tuned
        assert metrics["select_acc_warmup"] == warm
        assert metrics["weights"] == ("warmup" if warm > tuned else "raw")
        assert metrics["select_loss"] == (1.0 - warm if warm > tuned else 0.1)
