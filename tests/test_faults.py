"""Fault injection for training: checkpoints written atomically and kept two deep, one output folder per run,
resume tied to its run and files, MLflow runs that never stay RUNNING, transient store errors, alias races."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from finetune.cli import cli
from finetune.errors import UserError
from finetune.training import checkpoints
from tests.conftest import make_folder, tiny_train_args


def _train(*args: str):
    return CliRunner().invoke(cli, list(args))


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    assert len(runs) == 1
    return runs[0]


# --- checkpoints ---

def test_checkpoints_are_renamed_into_place_from_their_own_folder(image_folder: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """Lightning's own writer goes through the system temp folder; on another filesystem its rename is a copy
    that a kill cuts short. Every checkpoint must arrive by a rename from a file in its own folder."""
    renames, moves = [], []
    real_replace, real_move = os.replace, shutil.move
    monkeypatch.setattr(os, "replace", lambda src, dst, **kw: (renames.append((str(src), str(dst))),
                                                               real_replace(src, dst, **kw))[1])
    monkeypatch.setattr(shutil, "move", lambda src, dst, *a, **kw: (moves.append((str(src), str(dst))),
                                                                    real_move(src, dst, *a, **kw))[1])
    out = tmp_path / "out"
    r = _train(*tiny_train_args(image_folder, out, "--epochs", "2"))
    assert r.exit_code == 0, r.output
    into_ckpt = [(s, d) for s, d in renames + moves if d.endswith(".ckpt")]
    assert into_ckpt, "no checkpoint was renamed into place"
    assert all(Path(s).parent == Path(d).parent for s, d in into_ckpt), into_ckpt
    assert not [m for m in moves if m[1].endswith(".ckpt")]
    # Two deep: the resume point before the last one is kept, and both load.
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    prev = torch.load(out / "checkpoints" / "last.prev.ckpt", weights_only=True)
    assert (prev["epoch"], last["epoch"]) == (0, 1)
    # Each resume point knows the best epoch so far, this one included: resumed there, the run keeps choosing
    # among the same candidates as an uninterrupted run.
    for ckpt in (prev, last):
        scores = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EpochScores"))["scores"]
        best = next(v for k, v in ckpt["callbacks"].items() if "'monitor': 'select_acc'" in k)
        assert float(best["best_model_score"]) == max(s["select_acc"] for s in scores.values())


def test_a_checkpoint_write_onto_a_full_disk_leaves_the_previous_resume_point_loadable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    io = checkpoints.AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "state_dict": {"w": torch.ones(1000)}}, last)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"\x00" * 4096)  # part of the file reached the disk, then it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError) as e:
        io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.zeros(1000)}}, last)
    monkeypatch.setattr(torch, "save", real_save)
    assert "No space left on device" in e.value.message and "The earlier resume point is intact" in e.value.message
    assert checkpoints.load_checkpoint(last)["epoch"] == 0
    assert [p.name for p in last.parent.iterdir() if p.name != "last.ckpt"] == []  # no temp file left behind


def test_resume_falls_back_to_the_previous_checkpoint_when_the_last_is_cut_short(image_folder: Path, tmp_path: Path,
                                                                               isolated_mlflow: str):
    out = tmp_path / "out"
    assert _train(*tiny_train_args(image_folder, out, "--epochs", "2")).exit_code == 0
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # what a copy cut short by a kill leaves
    run_id = _summary(out)["mlflow_run_id"]
    r = _train("train", str(image_folder), "--resume", run_id, "--epochs", "3")
    assert r.exit_code == 0, r.output
    assert _summary(out)["resumed_from_epoch"] == 1  # from last.prev.ckpt (epoch 0 done), not from scratch


# --- one output folder per run ---

def test_two_runs_never_share_a_default_output_folder(image_folder: Path, tmp_path: Path):
    # The same run name in the same second: the folder's name still differs by the run id.
    outs = []
    for _ in range(2):
        args = [a for a in tiny_train_args(image_folder, tmp_path / "x") if a not in ("--output", str(tmp_path / "x"))]
        r = _train(*args, "--run-name", "same")
        assert r.exit_code == 0, r.output
        outs.append(sorted(p.name for p in (tmp_path / "outputs").iterdir()))
    assert len(outs[1]) == 2 and all(name.startswith("same-") for name in outs[1])


def test_a_reused_output_folder_is_refused(image_folder: Path, tmp_path: Path, isolated_mlflow: str):
    out = tmp_path / "out"
    assert _train(*tiny_train_args(image_folder, out)).exit_code == 0
    before = (out / "model" / "model.safetensors").read_bytes()
    run_id = _summary(out)["mlflow_run_id"]
    r = _train(*tiny_train_args(image_folder, out))
    assert r.exit_code == 2
    assert f"Output folder {out} is not empty" in r.output and f"--resume {run_id}" in r.output
    assert (out / "model" / "model.safetensors").read_bytes() == before
    assert _only_run(isolated_mlflow).info.run_id == run_id  # the refused run created nothing


def test_a_folder_held_by_a_live_run_is_refused_for_training_and_resuming(image_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert _train(*tiny_train_args(image_folder, out, "--epochs", "1")).exit_code == 0
    run_id = _summary(out)["mlflow_run_id"]
    with open(out / ".finetune.lock", "a") as held:  # what another process training there holds
        fcntl.flock(held, fcntl.LOCK_EX)
        r = _train("train", str(image_folder), "--resume", run_id, "--epochs", "2")
        assert r.exit_code == 2 and f"Run {run_id} is being trained by another process now" in r.output
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        with open(fresh / ".finetune.lock", "a") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            r = _train(*tiny_train_args(image_folder, fresh))
            assert r.exit_code == 2 and f"{fresh} is in use: another run is training there now" in r.output
    r = _train("train", str(image_folder), "--resume", run_id, "--epochs", "2")
    assert r.exit_code == 0, r.output


def test_two_train_processes_with_the_same_output_at_once_one_refuses(tmp_path: Path, isolated_mlflow: str):
    import subprocess
    import sys

    data = make_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "finetune.cli", *tiny_train_args(data, out), "--tta", "none"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": isolated_mlflow}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(text for code, text in results if code == 2)
    assert "is in use: another run is training there now" in refused or "is not empty" in refused
    assert "Traceback" not in refused
    assert _summary(out)["mlflow_run_id"] == _only_run(isolated_mlflow).info.run_id


# --- resume is tied to its run and its files ---

def test_resume_refuses_a_changed_file_list_and_says_what_changed(tmp_path: Path):
    data = make_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "out"
    assert _train(*tiny_train_args(data, out, "--epochs", "1")).exit_code == 0
    run_id = _summary(out)["mlflow_run_id"]
    shutil.copy(data / "cat" / "cat_0.png", data / "cat" / "cat_new.png")
    (data / "dog" / "dog_1.png").unlink()
    r = _train("train", str(data), "--resume", run_id, "--epochs", "2")
    assert r.exit_code == 2
    assert f"The images of run {run_id} changed since it started" in r.output
    assert "1 added" in r.output and "cat/cat_new.png" in r.output
    assert "1 removed" in r.output and "dog/dog_1.png" in r.output


def test_resume_refuses_a_checkpoint_of_another_run(image_folder: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert _train(*tiny_train_args(image_folder, out, "--epochs", "1")).exit_code == 0
    shutil.copy(b / "checkpoints" / "last.ckpt", a / "checkpoints" / "last.ckpt")
    run_a, run_b = _summary(a)["mlflow_run_id"], _summary(b)["mlflow_run_id"]
    r = _train("train", str(image_folder), "--resume", run_a, "--epochs", "2")
    assert r.exit_code == 2 and f"belongs to MLflow run {run_b}, not {run_a}" in r.output


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(image_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert _train(*tiny_train_args(image_folder, out, "--epochs", "1")).exit_code == 0
    run_id = _summary(out)["mlflow_run_id"]
    shutil.rmtree(out / "checkpoints")  # as if killed during its first epoch
    (out / "summary.json").unlink()
    MlflowClient().set_terminated(run_id, "KILLED")
    r = _train("train", str(image_folder), "--resume", run_id)
    assert r.exit_code == 0, r.output
    assert _summary(out)["mlflow_run_id"] == run_id and _summary(out)["resumed_from_epoch"] == 0


# --- MLflow ---

def test_any_error_ends_the_mlflow_run_failed(image_folder: Path, tmp_path: Path, isolated_mlflow: str,
                                               monkeypatch: pytest.MonkeyPatch):
    from finetune.evaluation import trust

    def out_of_memory(*args, **kwargs):
        raise MemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trust, "choose_after_training", out_of_memory)
    r = _train(*tiny_train_args(image_folder, tmp_path / "out"))
    assert r.exit_code != 0 and isinstance(r.exception, MemoryError)
    assert _only_run(isolated_mlflow).info.status == "FAILED"


def test_a_transient_store_error_is_retried_not_taken_for_an_outage(image_folder: Path, tmp_path: Path,
                                                                    isolated_mlflow: str,
                                                                    monkeypatch: pytest.MonkeyPatch):
    from sqlalchemy.exc import OperationalError

    from finetune import tracking

    monkeypatch.setattr(tracking, "RETRY_DELAYS_S", (0.01, 0.02))
    real = MlflowClient.log_batch
    failures = []

    def locked_once(self, *args, **kwargs):
        if not failures and kwargs.get("metrics"):
            failures.append(1)
            raise OperationalError("INSERT INTO metrics", {}, Exception("database is locked"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", locked_once)
    out = tmp_path / "out"
    r = _train(*tiny_train_args(image_folder, out, "--epochs", "2"))
    assert r.exit_code == 0, r.output
    assert failures and not (out / "mlflow_pending.json").exists()
    run = MlflowClient(isolated_mlflow).get_run(_summary(out)["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(MlflowClient(isolated_mlflow).get_metric_history(run.info.run_id, "select_acc")) == 2


def test_concurrent_registrations_set_champion_once_and_candidate_to_the_newest(
        image_folder: Path, tmp_path: Path, isolated_mlflow: str, monkeypatch: pytest.MonkeyPatch):
    from finetune.tracking import registry

    out = tmp_path / "out"
    assert _train(*tiny_train_args(image_folder, out)).exit_code == 0
    uri = _summary(out)["model_uri"]
    real_get = MlflowClient.get_registered_model

    def slow_get(self, name):
        model = real_get(self, name)
        time.sleep(0.5)  # the other registration runs its check meanwhile
        return model

    champion_sets = []
    real_set = MlflowClient.set_registered_model_alias

    def counting_set(self, name, alias, version):
        if alias == registry.CHAMPION:
            champion_sets.append(version)
        return real_set(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "get_registered_model", slow_get)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", counting_set)
    versions = []
    threads = [threading.Thread(target=lambda: versions.append(registry.register(uri, "m", {}))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == ["1", "2"]
    assert len(champion_sets) == 1
    aliases = real_get(MlflowClient(isolated_mlflow), "m").aliases
    assert str(aliases["candidate"]) == "2" and str(aliases["champion"]) == str(champion_sets[0])
