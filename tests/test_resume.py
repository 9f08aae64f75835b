"""Resume after an interruption, determinism of a seeded run, and refusing checkpoints with code."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from finetune.cli import cli
from tests.conftest import make_folder, tiny_train_args


def _train(*args: str):
    return CliRunner().invoke(cli, list(args))


def _history(uri: str, run_id: str, key: str = "select_acc") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key),
                                                key=lambda m: (m.step, m.timestamp))]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_seeded_runs_are_identical_and_resume_matches_uninterrupted(image_folder: Path, tmp_path: Path,
                                                                    isolated_mlflow: str):
    full_a, full_b, part = tmp_path / "a", tmp_path / "b", tmp_path / "part"
    # A schedule that does not depend on --epochs (the part run is extended from 1 to 2 epochs) and no
    # random augmentation; dropout/drop-path, shuffling and optimizer state still have to come back.
    recipe = ("--schedule", "constant", "--warmup-epochs", "0", "--augment", "none", "--drop-path", "0.1")
    for out in (full_a, full_b):
        r = _train(*tiny_train_args(image_folder, out, "--epochs", "2", "--seed", "7", *recipe))
        assert r.exit_code == 0, r.output
    run_a, run_b = _summary(full_a)["mlflow_run_id"], _summary(full_b)["mlflow_run_id"]
    # --seed: same split, init, shuffling and augmentation, so the same numbers in every epoch.
    assert _history(isolated_mlflow, run_a, "train_loss") == _history(isolated_mlflow, run_b, "train_loss")
    assert _history(isolated_mlflow, run_a, "select_loss") == _history(isolated_mlflow, run_b, "select_loss")

    r = _train(*tiny_train_args(image_folder, part, "--epochs", "1", "--seed", "7", *recipe))
    assert r.exit_code == 0, r.output
    run_p = _summary(part)["mlflow_run_id"]
    r = _train("train", str(image_folder), "--resume", run_p, "--epochs", "2")
    assert r.exit_code == 0, r.output
    resumed = _summary(part)
    assert resumed["mlflow_run_id"] == run_p and resumed["resumed_from_epoch"] == 1
    run = MlflowClient(isolated_mlflow).get_run(run_p)
    assert run.info.status == "FINISHED"
    # One point per epoch at the same steps as the uninterrupted run, none duplicated, and the same
    # values within noise: weights, optimizer, RNG and callback states came back from the checkpoint.
    for key in ("train_loss", "select_loss", "select_acc"):
        resumed_h, full_h = _history(isolated_mlflow, run_p, key), _history(isolated_mlflow, run_a, key)
        assert [s for s, _ in resumed_h] == [s for s, _ in full_h], key
        assert resumed_h[0] == full_h[0], key  # the epoch before the interruption is the same run
        assert resumed_h[1][1] == pytest.approx(full_h[1][1], rel=0.05, abs=0.01), key
    assert abs(resumed["metrics"]["val_acc"] - _summary(full_a)["metrics"]["val_acc"]) <= 0.01


def test_resume_last_refuses_changed_options_and_unknown_runs(image_folder: Path, tmp_path: Path):
    r = _train("train", str(image_folder), "--resume", "last")
    assert r.exit_code == 2 and "No finetune run to resume in MLflow experiment 'finetune'" in r.output
    r = _train("train", str(image_folder), "--resume", "0123456789abcdef")
    assert r.exit_code == 2 and "No MLflow run '0123456789abcdef'" in r.output
    out = tmp_path / "out"
    assert _train(*tiny_train_args(image_folder, out)).exit_code == 0
    r = _train("train", str(image_folder), "--resume", "last", "--lr", "0.5")
    assert r.exit_code == 2 and "Cannot change lr when resuming run" in r.output
    r = _train("train", str(image_folder / "cat"), "--resume", "last")
    assert r.exit_code == 2 and "resume it with the same data folder" in r.output
    r = _train("train", str(image_folder), "--resume", "last")
    assert r.exit_code == 2 and "already trained 1 epoch(s) and finished; pass --epochs larger than 1" in r.output


def test_sigterm_saves_checkpoint_and_resume_finishes_the_run(tmp_path: Path, isolated_mlflow: str):
    data = make_folder(tmp_path / "data", per_class=24)
    out = tmp_path / "out"
    last = out / "checkpoints" / "last.ckpt"
    sent = []

    def terminate_after_first_epoch():
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline:
            time.sleep(0.05)
        sent.append(time.time())
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler (SLURM, Kubernetes) sends before killing

    threading.Thread(target=terminate_after_first_epoch, daemon=True).start()
    r = _train(*tiny_train_args(data, out, "--epochs", "20", "--batch-size", "2"))
    assert sent, "the run ended before its first checkpoint"
    assert r.exit_code == 130, r.output
    assert "Training interrupted in epoch" in r.output and "--resume" in r.output
    config = json.loads((out / "config.json").read_text())
    run_id = MlflowClient(isolated_mlflow).search_runs(
        [MlflowClient(isolated_mlflow).get_experiment_by_name("finetune").experiment_id])[0].info.run_id
    assert MlflowClient(isolated_mlflow).get_run(run_id).info.status == "KILLED"
    stopped = torch.load(last, weights_only=True)
    assert stopped["epoch"] < 19  # it stopped early, and the checkpoint says where

    r = _train("train", str(data), "--resume", run_id, "--epochs", "3" if stopped["epoch"] < 2 else str(
        stopped["epoch"] + 2))
    assert r.exit_code == 0, r.output
    epochs = json.loads((out / "config.json").read_text())["epochs"]
    assert config["epochs"] == 20 and epochs >= 3
    steps = [s for s, _ in _history(isolated_mlflow, run_id)]
    assert len(steps) == epochs and len(set(steps)) == epochs  # one val point per epoch, none twice
    assert MlflowClient(isolated_mlflow).get_run(run_id).info.status == "FINISHED"


class _RunsCode:
    """Unpickling this calls os.mkdir: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_with_pickled_code_is_refused(image_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert _train(*tiny_train_args(image_folder, out)).exit_code == 0
    marker = tmp_path / "code-ran"
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["payload"] = _RunsCode(marker)
    torch.save(checkpoint, last)
    r = _train("train", str(image_folder), "--resume", "last", "--epochs", "2")
    assert r.exit_code == 2
    assert "Refused to load checkpoint" in r.output and "pickled Python objects" in r.output
    assert not marker.exists()


def test_weights_file_with_pickled_code_is_refused(image_folder: Path, tmp_path: Path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _RunsCode(marker)}, evil)
    r = _train("train", str(image_folder), "--model", "test_resnet", "--weights", str(evil), "--epochs", "1",
               "--batch-size", "4", "--num-workers", "0")
    assert r.exit_code == 2
    assert f"Refused to load {evil}" in r.output and "pickled Python objects" in r.output
    assert not marker.exists()


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path):
    import random

    import numpy as np

    from finetune.training.checkpoints import RngState

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    path = tmp_path / "rng.pt"
    torch.save(RngState().state_dict(), path)
    first = (torch.rand(3).tolist(), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    RngState().load_state_dict(torch.load(path, weights_only=True))
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == first
