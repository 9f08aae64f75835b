"""SIGKILL at random moments of a training run, then `--resume`: it always resumes and ends where an uninterrupted
run ends (slow: two training processes per kill; FINETUNE_KILLS sets how many kills, 20 by default)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import make_folder, tiny_train_args

pytestmark = pytest.mark.slow


def _command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", *tiny_train_args(data, out, "--epochs", "3", "--batch-size", "2"),
            "--tta", "none", "--seed", "3"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _result(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    summary = json.loads((out / "summary.json").read_text())
    return summary, load_file(str(out / "model" / "model.safetensors"))


def test_sigkill_at_random_moments_then_resume_ends_like_an_uninterrupted_run(tmp_path: Path, isolated_mlflow: str):
    data = make_folder(tmp_path / "data", classes=("red", "blue", "green"), per_class=10)
    env = {**os.environ, "MLFLOW_TRACKING_URI": isolated_mlflow, "PYTHONUNBUFFERED": "1"}
    # The reference run, timed: from its start to the moment its MLflow run exists (what comes before is the
    # interpreter starting and the data being scanned), and to its end. Kills fall between the two.
    started = time.monotonic()
    with open(tmp_path / "reference.log", "w") as sink:
        reference = subprocess.Popen(_command(data, tmp_path / "reference"), cwd=tmp_path, env=env,
                                     stdout=subprocess.DEVNULL, stderr=sink)
        while reference.poll() is None and not (tmp_path / "reference" / "run.json").exists():
            time.sleep(0.05)
        claimed = time.monotonic() - started
        assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    span = time.monotonic() - started
    ref_summary, ref_weights = _result(tmp_path / "reference")
    rng = random.Random(0)
    kills = int(os.environ.get("FINETUNE_KILLS", "20"))
    outcomes = []
    for i in range(kills):
        out = tmp_path / f"run{i}"
        log = tmp_path / f"run{i}.log"
        with open(log, "w") as sink:
            proc = subprocess.Popen(_command(data, out), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                    stderr=sink)
        moment = rng.uniform(min(claimed, 0.9 * span), span)
        launched = time.monotonic()
        try:
            proc.wait(timeout=moment)
            assert proc.returncode == 0, log.read_text()[-3000:]
            outcomes.append("finished first")
            span = max(claimed, min(span, time.monotonic() - launched))  # the reference ran slower: aim inside
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            run_file = out / "run.json"
            run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
            if run_id and MlflowClient(isolated_mlflow).get_run(run_id).info.status == "FINISHED":
                outcomes.append(f"killed at {moment:.1f}s, after the run had finished")
            elif run_id:  # the run exists: resume it
                resumed = _run([sys.executable, "-m", "finetune.cli", "train", str(data), "--resume", run_id],
                               tmp_path, env)
                outcomes.append(f"killed at {moment:.1f}s, resumed")
            else:  # killed before its MLflow run existed: the same command starts it afresh
                resumed = _run(_command(data, out), tmp_path, env)
                outcomes.append(f"killed at {moment:.1f}s, before the run existed: started again")
            if "finished" not in outcomes[-1]:
                assert resumed.returncode == 0, (i, moment, resumed.stdout[-2000:], resumed.stderr[-3000:])
        summary, weights = _result(out)
        for key in ("val_acc", "select_acc"):
            assert summary["metrics"][key] == ref_summary["metrics"][key], (i, outcomes[-1], key)
        assert weights.keys() == ref_weights.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, ref_weights[name], rtol=1e-4, atol=1e-5, msg=f"{i} {outcomes[-1]} {name}")
    assert sum("resumed" in o for o in outcomes) >= kills // 4, outcomes
