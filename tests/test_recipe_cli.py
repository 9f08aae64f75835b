"""The training recipe end to end through the CLI: EMA, schedules, divergence, early stopping,
and the babysitting commands (sanity, lr-find, sweep)."""

from __future__ import annotations

import json
import time
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from pytorch_lightning.callbacks import ModelCheckpoint

from finetune.training.callbacks import DivergenceCallback, DivergenceError
from finetune.cli import cli
from finetune.config import load_yaml, resolve_config
from tests.conftest import TINY_MODEL, make_folder, tiny_train_args


def _run(args: list[str]):
    return CliRunner().invoke(cli, args)


def test_recipe_options_train_with_ema_step_schedule_and_gap(image_folder: Path, tmp_path: Path, isolated_mlflow: str):
    out = tmp_path / "out"
    result = _run(tiny_train_args(
        image_folder, out, "--epochs", "2", "--ema", "0.5", "--schedule", "step", "--step-epochs", "1",
        "--warmup-epochs", "0", "--optimizer", "sgd", "--nesterov", "--lr", "0.05", "--mixup", "0.2",
        "--label-smoothing", "0.1", "--dropout", "0.1", "--drop-path", "0.1", "--drop-connect", "0.2",
        "--class-weights", "auto", "--sampler", "balanced", "--augment", "strong"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["augment"] == "strong" and summary["recipe"]["ema"] == 0.5
    metrics = summary["metrics"]
    # With --ema the EMA weights are the model: validated each epoch (select_acc), the best epoch's checkpointed
    # as the state_dict with the raw weights beside it, and reported as such.
    assert metrics["weights"] == "ema" and "val_acc_ema" not in metrics and "val_acc_raw" not in metrics
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    ema_state, raw_state = last["state_dict"], last["current_model_state"]
    assert any(not torch.equal(v, raw_state[k]) for k, v in ema_state.items() if v.is_floating_point())
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert "current_model_state" in best and best["epoch"] == metrics["best_epoch"]

    client = MlflowClient(isolated_mlflow)
    run_id = summary["mlflow_run_id"]
    assert len(client.get_metric_history(run_id, "select_acc")) == 2
    assert max(m.value for m in client.get_metric_history(run_id, "select_acc")) == pytest.approx(metrics["select_acc"])
    assert len(client.get_metric_history(run_id, "train_select_acc_gap")) == 2
    assert client.get_metric_history(run_id, "initial_loss")
    # The LR of every group is logged, and the step schedule drops it at the epoch boundary.
    steps_per_epoch = summary["selection"]["fit_images"] // 4  # the network fits on train less the selection split
    for group in ("lr/all", "lr/all/no_decay"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, group)}
        assert history[0] == pytest.approx(0.05)
        assert history[steps_per_epoch - 1] == pytest.approx(0.05)
        assert history[steps_per_epoch] == pytest.approx(0.005)


def test_yaml_config_sets_recipe_options(image_folder: Path, tmp_path: Path):
    config = tmp_path / "recipe.yaml"
    config.write_text("augment: none\nema: 0\nschedule: cosine\nwarmup-epochs: 1\noptimizer: rmsprop\n")
    out = tmp_path / "out"
    result = _run(tiny_train_args(image_folder, out, "--config", str(config)))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["augment"] == "none" and summary["recipe"]["schedule"] == "cosine"
    assert "val_acc_ema" not in summary["metrics"] and summary["metrics"]["weights"] == "raw"


@pytest.mark.parametrize("args, valid", [
    (["--optimizer", "lamb"], "sgd"),
    (["--schedule", "poly"], "onecycle"),
    (["--augment", "heavy"], "strong"),
])
def test_cli_refuses_unknown_values_listing_valid_ones(image_folder: Path, tmp_path: Path, args, valid):
    result = _run(tiny_train_args(image_folder, tmp_path / "out", *args))
    assert result.exit_code == 2
    assert valid in result.output


def test_unknown_value_in_yaml_lists_valid_ones(image_folder: Path, tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text("optimizer: lamb\n")
    result = _run(tiny_train_args(image_folder, tmp_path / "out", "--config", str(config)))
    assert result.exit_code == 2
    assert "Invalid optimizer 'lamb'. Valid values: sgd, adagrad, rmsprop, adam, adamw." in result.output
    assert "Traceback" not in result.output


def test_divergence_stops_training_with_a_clear_message(image_folder: Path, tmp_path: Path, isolated_mlflow: str):
    out = tmp_path / "out"
    result = _run(tiny_train_args(image_folder, out, "--epochs", "2", "--optimizer", "sgd", "--lr", "1e8",
                                  "--schedule", "constant", "--warmup-epochs", "0", "--augment", "none"))
    assert result.exit_code == 2, result.output
    assert "Training diverged at epoch 0" in result.output
    assert "no checkpoint was saved yet" in result.output and "--lr" in result.output
    runs = MlflowClient(isolated_mlflow).search_runs([MlflowClient(isolated_mlflow).get_experiment_by_name(
        "finetune").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_divergence_message_names_the_last_good_checkpoint(tmp_path: Path):
    good = tmp_path / "last.ckpt"
    good.write_bytes(b"checkpoint")
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    checkpoint.last_model_path = str(good)
    callback = DivergenceCallback(num_classes=3, checkpoint=checkpoint)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.1)}, None, 0)  # first loss: fine
    callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(5.0)}, None, 1)  # below 10x: fine
    with pytest.raises(DivergenceError, match=f"exceeds 10x.*last good checkpoint is {good}"):
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(50.0)}, None, 2)
    with pytest.raises(DivergenceError, match="not a number"):
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(math.nan)}, None, 3)


def test_early_stopping_stops_when_val_acc_stalls(image_folder: Path, tmp_path: Path, isolated_mlflow: str):
    out = tmp_path / "out"
    # An LR of ~0 cannot improve val_acc, so patience 1 stops after the second epoch of five.
    result = _run(tiny_train_args(image_folder, out, "--epochs", "5", "--lr", "1e-12", "--patience", "1",
                                  "--augment", "none", "--ema", "0"))
    assert result.exit_code == 0, result.output
    run_id = json.loads((out / "summary.json").read_text())["mlflow_run_id"]
    assert len(MlflowClient(isolated_mlflow).get_metric_history(run_id, "select_acc")) == 2


def test_sanity_overfits_a_small_subset(tmp_path: Path):
    data = make_folder(tmp_path / "data", per_class=6)
    result = _run(["sanity", str(data), "--model", TINY_MODEL, "--weights", "none", "--image-size", "32",
                   "--num-workers", "0", "--batch-size", "4", "--samples", "6", "--epochs", "12", "--lr", "0.01"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "train accuracy 1.000" in result.output
    assert "ln 2 = 0.693" in result.output


def test_sanity_reports_failure_when_it_cannot_overfit(tmp_path: Path):
    data = make_folder(tmp_path / "data", per_class=6)
    result = _run(["sanity", str(data), "--model", TINY_MODEL, "--weights", "none", "--image-size", "32",
                   "--num-workers", "0", "--batch-size", "4", "--samples", "6", "--epochs", "1", "--lr", "1e-12"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


@pytest.mark.parametrize("command, extra, flag", [
    ("sanity", ["--devices", "2", "--strategy", "ddp"], "No such option '--devices'"),
    ("lr-find", ["--register", "x"], "--register"),
    ("plan", ["--register", "x"], "--register"),
])
def test_options_these_commands_ignore_are_refused(tmp_path: Path, command: str, extra: list[str], flag: str):
    data = make_folder(tmp_path / "data", per_class=4)
    result = _run([command, str(data), "--model", TINY_MODEL, "--weights", "none", "--image-size", "32",
                   "--num-workers", "0", *extra])
    assert result.exit_code != 0 and flag in result.output and "Traceback" not in result.output, result.output


def test_lr_find_writes_a_png_and_logs_it(image_folder: Path, tmp_path: Path, isolated_mlflow: str):
    out = tmp_path / "lrf"
    result = _run(["lr-find", str(image_folder), "--model", TINY_MODEL, "--weights", "none", "--image-size", "32",
                   "--num-workers", "0", "--batch-size", "4", "--num-training", "20", "--output", str(out)])
    assert result.exit_code == 0, result.output
    png = out / "lr_find.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggested lr:" in result.output or "No suggestion" in result.output
    found = json.loads((out / "lr_find.json").read_text())
    assert len(found["lrs"]) == len(found["losses"]) > 10 and found["lrs"][0] < found["lrs"][-1]
    client = MlflowClient(isolated_mlflow)
    run = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])[0]
    assert {"lr_find.png", "lr_find.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # From random init the plan trains the network: what was measured, and that the suggestion is train's --lr.
    assert found["trains"] == "network" and found["suggestion_is"] == "train's --lr"
    assert run.data.params["plan"] == found["plan"] and run.data.tags["finetune.plan"] == found["plan"]
    assert f"plan {found['plan']}" in result.output


def test_lr_find_on_a_feature_plan_tests_the_head_on_cached_features(tmp_path: Path, isolated_mlflow: str,
                                                                     monkeypatch: pytest.MonkeyPatch):
    import finetune.training.range_test as range_test

    data = make_folder(tmp_path / "data", per_class=12)
    network_tested = []
    monkeypatch.setattr(range_test, "_network_range_test", lambda *a, **k: network_tested.append(1))
    out = tmp_path / "lrf"
    started = time.perf_counter()
    result = _run(["lr-find", str(data), "--model", TINY_MODEL, "--weights", "none", "--image-size", "32",
                   "--scenario", "small-similar", "--num-workers", "0", "--batch-size", "4",
                   "--min-lr", "1e-5", "--max-lr", "10", "--num-training", "60", "--output", str(out)])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    found = json.loads((out / "lr_find.json").read_text())
    assert not network_tested and found["trains"] == "linear head on cached features"
    assert found["plan"] == "small-similar" and "cached" in found["measured"]
    assert 10 < found["steps"] <= 60 and found["lrs"][0] == pytest.approx(1e-5)  # it may stop on divergence
    assert found["suggested_lr"] is not None and 1e-5 <= found["suggested_lr"] <= 10
    assert found["descent_start_lr"] <= found["suggested_lr"] < found["curve_min_lr"]
    assert f"use --lr {found['suggested_lr']:.3g}" in result.output and "cached" in result.output
    assert seconds < 120, seconds  # no network pass per step: features are computed once


def test_sweep_runs_child_trials_and_saves_a_usable_best_config(image_folder: Path, tmp_path: Path,
                                                               isolated_mlflow: str):
    out = tmp_path / "sweep"
    result = _run(["sweep", str(image_folder), "--trials", "2", "--model", TINY_MODEL, "--weights", "none",
                   "--image-size", "32", "--num-workers", "0", "--batch-size", "4", "--epochs", "1",
                   "--experiment", "sw", "--output", str(out), "--register", "swept"])
    assert result.exit_code == 0, result.output
    assert "best select_acc" in result.output
    client = MlflowClient(isolated_mlflow)
    runs = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert "best_config.yaml" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    trial_lrs = sorted(float(r.data.params["config.lr"]) for r in children)
    assert any(math.isclose(best["lr"], x, rel_tol=1e-6) for x in trial_lrs)
    cfg = resolve_config(load_yaml(out / "best_config.yaml"), {"data_dir": str(image_folder)})
    assert cfg.lr == best["lr"] and cfg.model == TINY_MODEL
    # --register NAME: the best trial's model, as train --register registers a run's
    best_run = next(r for r in children if math.isclose(float(r.data.params["config.lr"]), best["lr"], rel_tol=1e-6))
    version = client.get_model_version("swept", "1")
    assert version.run_id == best_run.info.run_id and "Registered the best trial's model: models:/swept/1" in result.output
    assert client.get_registered_model("swept").aliases == {"candidate": 1, "champion": 1}


@pytest.mark.parametrize("command", ["sanity", "lr-find", "sweep"])
def test_commands_have_help(command: str):
    result = _run([command, "--help"])
    assert result.exit_code == 0 and "--augment" in result.output


def test_lr_find_on_a_network_plan_keeps_the_group_lr_ratios(image_folder: Path, tmp_path: Path,
                                                             isolated_mlflow: str, monkeypatch: pytest.MonkeyPatch):
    import finetune.training.range_test as range_test

    held = []
    real = range_test.hold_lr_ratios
    monkeypatch.setattr(range_test, "hold_lr_ratios", lambda opt, head_lr: held.append(real(opt, head_lr)) or held[-1])
    out = tmp_path / "lrf"
    result = _run(["lr-find", str(image_folder), "--model", TINY_MODEL, "--weights", "none", "--image-size", "32",
                   "--scenario", "large-similar", "--backbone-lr-mult", "0.1", "--num-workers", "0",
                   "--batch-size", "4", "--num-training", "12", "--output", str(out)])
    assert result.exit_code == 0, result.output
    found = json.loads((out / "lr_find.json").read_text())
    assert found["trains"] == "network" and found["plan"] == "large-similar"
    ratios = {r["lr_ratio"] for r in found["group_lr_ratios"]}
    assert 1.0 in ratios and min(ratios) <= 0.1 + 1e-9  # the head at --lr, the backbone at a tenth (or less)
    assert held and 1.0 in held[0] and min(held[0]) <= 0.1 + 1e-9  # held on the optimizer the finder drove
