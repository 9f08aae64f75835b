"""`--devices 2 --strategy ddp` on CPU (gloo): one MLflow run, one evaluation, ranks in sync.

Lightning's ddp re-launches the whole command per rank, so the run happens in its own process, with a
bounded time limit for all of its ranks. Part of the default suite (CI): tiny data, tiny model, two
epochs, no loader workers; nearly all of its ~45 s (2 busy cores) is each rank importing torch,
Lightning and MLflow, one after the other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import make_folder, run_bounded, tiny_train_args

pytestmark = pytest.mark.ddp
REPO = Path(__file__).resolve().parents[1]


def test_ddp_two_cpu_processes_train_and_log_once(tmp_path: Path, isolated_mlflow: str):
    data = make_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "out"
    # large-similar with 2 frozen groups: frozen layer groups and a head warm-up before the rest learn,
    # the path where ranks can drift apart (freezing.py); from random init it costs no more than full
    # fine-tuning.
    args = tiny_train_args(data, out, "--epochs", "2", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                           "--experiment", "ddp", "--scenario", "large-similar", "--freeze-groups", "2")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = run_bounded([sys.executable, "-m", "finetune.cli", *args], timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("MLflow run: ") == 1  # only rank 0 reports

    summary = json.loads((out / "summary.json").read_text())
    ddp = summary["ddp"]
    assert summary["plan"]["scenario"] == "large-similar" and "Layer groups: 2 frozen" in proc.stderr
    assert ddp["world_size"] == 2 and ddp["ranks_in_sync"] is True
    assert len(ddp["param_fingerprints"]) == 2 and ddp["param_fingerprints"][0] == ddp["param_fingerprints"][1]

    client = MlflowClient(isolated_mlflow)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]  # one run, not one per rank
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "select_acc")) == 2  # one point per epoch (selection split)
    assert run.data.metrics["final_val_acc"] == summary["metrics"]["val_acc"]
    assert {"summary.json", "model_files"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def _torchrun(*args: str) -> list[str]:
    # --standalone: a free rendezvous port on localhost, so parallel test runs do not collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _fresh_store(tmp_path: Path) -> dict[str, str]:
    """An MLflow store that does not exist yet: the first client creates its tables (a race if two do)."""
    (tmp_path / "fresh").mkdir()
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/fresh/mlflow.db"}


def test_torchrun_two_ranks_make_one_run_one_folder_one_version(tmp_path: Path, weights_file: Path):
    """torchrun starts both ranks itself, without --output / --run-name, against a new store: rank 0
    shares the run and the folder through the process group; rank 1 never opens the store."""
    data = make_folder(tmp_path / "data", per_class=8)
    env = _fresh_store(tmp_path)
    args = tiny_train_args(data, tmp_path / "unused", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                           "--scenario", "large-similar", "--freeze-groups", "2", "--register", "ddp-model")
    args[args.index("--weights") + 1] = str(weights_file)  # pretrained: the head is warmed up (on rank 0 alone)
    args = args[:args.index("--output")] + args[args.index("--output") + 2:]  # the default folder
    proc = run_bounded(_torchrun("-m", "finetune.cli", *args), timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("MLflow run: ") == 1
    assert proc.stderr.count("Head warm-up on cached features") == 1  # the one-time work ran once

    folders = list((tmp_path / "outputs").iterdir())
    assert len(folders) == 1, folders
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert summary["ddp"]["world_size"] == 2 and summary["ddp"]["ranks_in_sync"] is True
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    versions = client.search_model_versions("name='ddp-model'")
    assert [v.run_id for v in versions] == [summary["mlflow_run_id"]]


def test_nan_on_one_rank_stops_every_rank_and_fails_the_run(tmp_path: Path):
    """A NaN loss on rank 1 alone: both ranks stop at the same step with the divergence message, and
    rank 0 marks the run FAILED (it used to kill rank 1 alone and leave the run RUNNING)."""
    data = make_folder(tmp_path / "data", per_class=8)
    env = _fresh_store(tmp_path)
    out = tmp_path / "out"
    args = tiny_train_args(data, out, "--epochs", "3", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                           "--scenario", "large-similar", "--run-name", "nan-run")
    proc = run_bounded(_torchrun(str(REPO / "tests" / "ddp_nan_rank1.py"), *args), timeout=300, cwd=tmp_path,
                       env=env)
    assert proc.returncode != 0
    stopped = [line for line in proc.stderr.splitlines() if "Training diverged at epoch" in line]
    assert len(stopped) == 2, proc.stderr[-4000:]  # one per rank, the same words
    assert stopped[0] == stopped[1] and "on rank 1 is not a number" in stopped[0]
    assert "Traceback" not in proc.stderr.split("Training diverged")[0]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("nan-run", "FAILED")]
    assert [p.name for p in tmp_path.iterdir() if p.name == "outputs"] == []


def test_ctrl_c_under_torchrun_saves_a_resumable_checkpoint(tmp_path: Path):
    """Ctrl+C in a terminal: SIGINT to torchrun and both ranks (torchrun forwards its own to them too).
    Every rank stops after the same batch and takes part in writing last.ckpt; the run is KILLED."""
    data = make_folder(tmp_path / "data", per_class=24)
    env = _fresh_store(tmp_path)
    out = tmp_path / "out"
    last = out / "checkpoints" / "last.ckpt"
    args = tiny_train_args(data, out, "--epochs", "30", "--batch-size", "2", "--accelerator", "cpu",
                           "--devices", "2", "--strategy", "ddp", "--scenario", "large-similar")
    proc = subprocess.Popen(_torchrun("-m", "finetune.cli", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path, env=env)
    try:
        deadline = time.time() + 240
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert last.exists(), "no epoch checkpoint before the limit"
        first_epoch = torch.load(last, weights_only=True)["epoch"]
        time.sleep(0.5)  # inside the next epoch
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
        out_text, err = proc.communicate(timeout=90)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert err.count("Training interrupted in epoch") == 2, err[-4000:]  # both ranks, with the resume hint
    assert "--resume" in err and "Traceback" not in err.split("Training interrupted")[0]
    saved = torch.load(last, weights_only=True)
    assert first_epoch <= saved["epoch"] < 29 and saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert saved["global_step"] > 0 and "state_dict" in saved and "optimizer_states" in saved
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]
