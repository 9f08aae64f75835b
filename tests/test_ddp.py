"""`--devices 2 --strategy ddp` on CPU (gloo): one MLflow run, one evaluation, ranks in sync.

Lightning's ddp re-launches the whole command per rank, so the run happens in its own process, with a
bounded time limit for all of its ranks. Part of the default suite (CI): tiny data, tiny model, two
epochs, no loader workers; nearly all of its ~45 s (2 busy cores) is each rank importing torch,
Lightning and MLflow, one after the other.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
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
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 2  # one point per epoch
    assert run.data.metrics["final_val_acc"] == summary["metrics"]["val_acc"]
    assert {"summary.json", "model_files"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
