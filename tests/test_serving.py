"""The pyfunc model, the registry (aliases, tags, promote) and `finetune evaluate`."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from finetune.tracking import registry
from finetune.model.artifact import load_model
from finetune.cli import cli
from finetune.data.crops import CropViews
from tests.conftest import make_folder, tiny_train_args
from tests.model_helpers import logged_model


def png_bytes(color=(200, 30, 30), size=(40, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_train_register_load_by_alias_predicts_like_the_in_process_model(image_folder, tmp_path, isolated_mlflow):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, tiny_train_args(image_folder, out, "--register", "shapes", "--tta", "5crop"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["registered_model"] == {"name": "shapes", "version": "1"}
    assert 0.0 <= summary["metrics"]["val_acc_tta"] <= 1.0

    client = MlflowClient(isolated_mlflow)
    assert client.get_registered_model("shapes").aliases == {"candidate": 1, "champion": 1}
    tags = client.get_model_version("shapes", "1").tags
    assert tags["training_run_id"] == summary["mlflow_run_id"]
    assert tags["scenario"] == summary["scenario"]
    assert float(tags["metric.val_acc"]) == pytest.approx(summary["metrics"]["val_acc"], abs=1e-5)
    assert json.loads(tags["dataset_profile"])["n_train"] == summary["data"]["train"]  # the measured DatasetProfile
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["val_acc_tta"] == pytest.approx(summary["metrics"]["val_acc_tta"])
    report_files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/val")}
    assert {"evaluation/val/report.json", "evaluation/val/predictions.csv", "evaluation/val/confusion_matrix.png",
            "evaluation/val/top_losses.png"} <= report_files

    files = sorted(str(p) for p in image_folder.rglob("*.png"))
    model = mlflow.pyfunc.load_model("models:/shapes@champion")
    predicted = model.predict(pd.DataFrame({"image": [Path(f).read_bytes() for f in files]}),
                              params={"tta": "center", "top_k": 2})
    net, spec = load_model(summary["model_dir"])
    from finetune.data.images import load_rgb

    with torch.no_grad():
        logits = net(torch.cat([CropViews(spec.data_config, "center")(load_rgb(f)) for f in files]))
    expected = [spec.class_names[i] for i in logits.argmax(1).tolist()]
    assert predicted["label"].tolist() == expected
    calibrated = (logits / spec.temperature).softmax(1)  # the model's temperature, fitted on held-out train images
    assert predicted["score"].tolist() == pytest.approx(calibrated.max(1).values.tolist(), abs=1e-5)
    assert {"ood_score", "unknown"} <= set(predicted.columns) and not predicted["ood_score"].isna().any()
    assert all(len(t) == 2 for t in predicted["top_labels"])
    assert all(set(p) == {"cat", "dog"} and sum(p.values()) == pytest.approx(1.0) for p in predicted["probabilities"])
    assert model.metadata.signature.params.to_dict()[0]["default"] == "5crop"  # the training's tta
    # The weights went channels_last once, at load, and requests leave them so (no conversion per request).
    served = model.unwrap_python_model().net
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in served.parameters() if p.ndim == 4)
    assert any(not p.is_contiguous() for p in served.parameters() if p.ndim == 4)

    # A second version becomes the candidate; champion stays until promoted.
    second = registry.register(summary["model_uri"], "shapes", {"training_run_id": summary["mlflow_run_id"]})
    assert second == "2"
    assert client.get_registered_model("shapes").aliases == {"candidate": 2, "champion": 1}
    result = CliRunner().invoke(cli, ["promote", "shapes", "2"])
    assert result.exit_code == 0, result.output
    assert client.get_registered_model("shapes").aliases["champion"] == 2
    result = CliRunner().invoke(cli, ["promote", "shapes", "7"])
    assert result.exit_code == 2 and "has no version 7" in result.output and "1, 2" in result.output


def test_path_column_only_reads_under_the_configured_root(tmp_path):
    uri = logged_model(tmp_path)
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a.png").write_bytes(png_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    os.symlink(outside, allowed / "link.png")

    model = mlflow.pyfunc.load_model(uri, model_config={"path_root": str(allowed)})
    ok = model.predict(pd.DataFrame({"path": ["sub/a.png", str(allowed / "sub" / "a.png")]}))
    assert ok["label"].isin(["cat", "dog"]).all() and len(ok) == 2
    for bad in ["../secret.png", str(outside), "link.png", "sub/../../secret.png"]:
        with pytest.raises(MlflowException, match="outside the allowed root"):
            model.predict(pd.DataFrame({"path": [bad]}))

    no_root = mlflow.pyfunc.load_model(uri)
    with pytest.raises(MlflowException, match="'path' column is disabled"):
        no_root.predict(pd.DataFrame({"path": [str(allowed / "sub" / "a.png")]}))


def test_bad_requests_are_refused_with_a_reason(tmp_path):
    uri = logged_model(tmp_path, max_image_pixels=40 * 36)
    model = mlflow.pyfunc.load_model(uri)
    assert len(model.predict(pd.DataFrame({"image": [png_bytes()]}))) == 1
    with pytest.raises(MlflowException, match="row 1: not a readable image"):
        model.predict(pd.DataFrame({"image": [png_bytes(), b"plain text"]}))
    with pytest.raises(MlflowException, match="more than the limit of 1440"):
        model.predict(pd.DataFrame({"image": [png_bytes(size=(41, 36))]}))
    with pytest.raises(MlflowException, match="needs an 'image' column"):
        model.unwrap_python_model().predict(None, pd.DataFrame({"picture": [png_bytes()]}))
    with pytest.raises(MlflowException, match="Invalid tta"):
        model.predict(pd.DataFrame({"image": [png_bytes()]}), params={"tta": "7crop"})


def test_evaluate_command_reports_val_and_test(tmp_path, isolated_mlflow):
    uri = logged_model(tmp_path, classes=("cat", "dog"))
    data = tmp_path / "split"
    for part in ("train", "val", "test"):
        make_folder(data / part, per_class=3, seed=len(part))
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, ["evaluate", uri, str(data), "--tta", "10crop", "--num-workers", "0",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "evaluation.json").read_text())
    assert set(summary["metrics"]) == ({f"{split}_{m}_tta" for split in ("val", "test")
                                        for m in ("acc", "acc_top5", "ece", "ece_uncalibrated")}
                                       | {f"{split}_acc_tta_ci95_{end}" for split in ("val", "test")
                                          for end in ("low", "high")})
    m = summary["metrics"]
    assert m["test_acc_tta_ci95_low"] <= m["test_acc_tta"] <= m["test_acc_tta_ci95_high"]
    report = json.loads((out / "evaluation" / "test" / "report.json").read_text())
    assert report["images"] == 6 and report["tta"] == "10crop"
    assert sum(map(sum, report["confusion_matrix"])) == 6
    assert report["top1"] == pytest.approx(sum(report["confusion_matrix"][i][i] for i in range(2)) / 6)
    with open(out / "evaluation" / "test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))  # one row per image, in the split's order, the same predictions
    assert [Path(r["path"]).parent.name for r in rows] == ["cat"] * 3 + ["dog"] * 3
    assert [r["label"] for r in rows] == [Path(r["path"]).parent.name for r in rows]
    assert sum(int(r["correct"]) for r in rows) / 6 == pytest.approx(report["top1"])
    assert all(r["correct"] == str(int(r["prediction"] == r["label"])) and 0 < float(r["probability"]) <= 1
               for r in rows)
    for name in ("confusion_matrix.png", "top_losses.png"):
        assert Image.open(out / "evaluation" / "val" / name).size[0] > 100
    run = MlflowClient(isolated_mlflow).get_run(summary["mlflow_run_id"])
    assert run.data.tags["model_uri"] == uri and "test_acc_tta" in run.data.metrics

    make_folder(data / "val", classes=("cat", "dog", "bird"), per_class=2)
    result = CliRunner().invoke(cli, ["evaluate", uri, str(data / "val")])
    assert result.exit_code == 2 and "['bird']" in result.output


def test_evaluate_and_promote_help_and_bad_arguments(tmp_path):
    runner = CliRunner()
    for command, argument in (("evaluate", "MODEL_URI DATA_DIR"), ("promote", "NAME VERSION")):
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and argument in result.output
    result = runner.invoke(cli, ["evaluate", "runs:/0123456789abcdef/model", str(make_folder(tmp_path / "d"))])
    assert result.exit_code == 2 and "Cannot load model" in result.output
    result = runner.invoke(cli, ["evaluate", "models:/x@champion", str(tmp_path), "--tta", "3crop"])
    assert result.exit_code == 2 and "10crop" in result.output
    result = runner.invoke(cli, ["promote", "nothing-registered", "1"])
    assert result.exit_code == 2 and "has no version 1" in result.output


def test_pip_requirements_drop_local_version_labels(monkeypatch):
    """A `+cpu` / `+cu121` build pins the public version, which PyPI can install (as MLflow does)."""
    monkeypatch.setattr(registry, "version", lambda name: {"torch": "2.5.1+cpu", "torchvision": "0.20.1+cu121"}
                        .get(name, "1.0.0"))
    pins = registry._pip_requirements()
    assert "torch==2.5.1" in pins and "torchvision==0.20.1" in pins and "timm==1.0.0" in pins
    assert not any("+" in p for p in pins)


def test_evaluate_leaves_out_the_excluded_images_and_logs_them(tmp_path, isolated_mlflow):
    uri = logged_model(tmp_path, classes=("cat", "dog"))
    data = tmp_path / "split"
    for part in ("train", "val"):
        make_folder(data / part, per_class=3, seed=len(part))
    dropped = sorted((data / "val" / "cat").glob("*.png"))[0]
    listing = tmp_path / "reviewed.txt"
    listing.write_text(f"# reviewed\n{dropped}\n")
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, ["evaluate", uri, str(data), "--num-workers", "0", "--output", str(out),
                                      "--exclude", str(listing)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "evaluation.json").read_text())
    assert len(summary["excluded"]) == 1
    assert json.loads((out / "evaluation" / "val" / "report.json").read_text())["images"] == 5
    logged = MlflowClient(isolated_mlflow).download_artifacts(summary["mlflow_run_id"], "excluded.txt", str(tmp_path))
    assert Path(logged).read_text().strip().endswith(dropped.name)
