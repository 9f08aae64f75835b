"""A real HTTP round trip against `mlflow models serve` on 127.0.0.1 (slow: the server takes a while to start)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from finetune.tracking import registry
from tests.model_helpers import logged_model

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def b64_png(color, size=(40, 36)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@contextlib.contextmanager
def serving(tmp_path: Path, model_uri: str, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow models serve` of `model_uri` on a free port, up and answering /ping; (base URL, process)."""
    port = free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    command = [mlflow_cli, "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port)]
    with started_server(tmp_path, command, port, env) as up:
        yield up


@contextlib.contextmanager
def started_server(tmp_path: Path, command: list[str], port: int,
                   env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """A server `command` listening on `port`, up and answering /ping; (base URL, process)."""
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                              start_new_session=True)  # its own process group: the workers go down with it
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not start in time"
            time.sleep(1)
        yield base, server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()


@pytest.mark.slow
def test_mlflow_models_serve_round_trip(tmp_path: Path, isolated_mlflow: str):
    uri = logged_model(tmp_path, max_image_pixels=100_000)
    registry.register(uri, "served", {})
    with serving(tmp_path, "models:/served@champion", {"MLFLOW_TRACKING_URI": isolated_mlflow}) as (base, _):
        images = [b64_png((220, 40, 40)), b64_png((40, 40, 220))]
        status, body = post(f"{base}/invocations", {
            "dataframe_split": {"columns": ["image"], "data": [[images[0]], [images[1]]]},
            "params": {"tta": "10crop", "top_k": 2}})
        assert status == 200, body
        rows = body["predictions"]
        assert len(rows) == 2
        assert set(rows[0]) == {"label", "score", "top_labels", "top_scores", "probabilities", "ood_score", "unknown"}
        assert rows[0]["label"] in ("cat", "dog") and rows[0]["label"] == rows[0]["top_labels"][0]
        assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

        status, records = post(f"{base}/invocations", {"dataframe_records": [{"image": images[0]}],
                                                        "params": {"tta": "10crop", "top_k": 2}})
        assert status == 200, records
        same = records["predictions"][0]
        assert same["label"] == rows[0]["label"] and same["score"] == pytest.approx(rows[0]["score"], abs=1e-6)

        not_image = base64.b64encode(b"definitely not an image").decode()
        bad_requests = [
            {"dataframe_split": {"columns": ["image"], "data": [[not_image]]}},
            {"dataframe_records": [{"image": _big_png()}]},
            {"dataframe_records": [{"picture": images[0]}]},
            {"dataframe_records": [{"path": "/etc/passwd"}]},
        ]
        for bad in bad_requests:
            status, error = post(f"{base}/invocations", bad)
            assert 400 <= status < 500, (bad, status, error)
            assert error.get("message"), error
        status, body = post(f"{base}/invocations", {"dataframe_records": [{"image": images[1]}]})
        assert status == 200 and body["predictions"][0]["label"] == rows[1]["label"]  # still serving


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Samples the process tree's RSS every 0.1 s while the block runs; the list holds the peak so far."""
    peak, done = [tree_rss(pid)], threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


@pytest.mark.slow
def test_over_limit_requests_are_refused_in_bounded_memory(tmp_path: Path, isolated_mlflow: str):
    registry.register(logged_model(tmp_path), "bounded", {})
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(base64.b64decode(b64_png((9, 9, 9))))
    env = {"MLFLOW_TRACKING_URI": isolated_mlflow, "FINETUNE_MAX_REQUEST_ROWS": "64",
           "FINETUNE_MAX_REQUEST_BYTES": str(2**20), "FINETUNE_PATH_ROOT": str(root)}
    tiny = b64_png((200, 30, 30), size=(8, 8))
    too_many = {"dataframe_split": {"columns": ["image"], "data": [[tiny]] * 65}, "params": {"tta": "10crop"}}
    noise = base64.b64encode(os.urandom(400_000)).decode()  # 3 of them: 1.2 MB of image bytes
    too_big = {"dataframe_split": {"columns": ["image"], "data": [[noise]] * 3}, "params": {"tta": "10crop"}}
    with serving(tmp_path, "models:/bounded@champion", env) as (base, server), peak_rss(server.pid) as peak:
        for i in range(50):
            status, error = post(f"{base}/invocations", too_many if i % 2 else too_big)
            limit = "the limit of 64 rows" if i % 2 else f"the limit of {2**20} bytes"
            assert status == 400 and limit in error["message"] and "FINETUNE_MAX_REQUEST_" in error["message"], error
        status, error = post(f"{base}/invocations", {"dataframe_records": [{"path": "a.png\u0000.txt"}]})
        assert status == 400 and "NUL byte" in error["message"], error
        assert "stack_trace" not in error and "Traceback" not in json.dumps(error)
        for normal in ({"dataframe_records": [{"image": tiny}] * 64}, {"dataframe_records": [{"path": "a.png"}]}):
            status, body = post(f"{base}/invocations", {**normal, "params": {"tta": "10crop"}})
            assert status == 200 and len(body["predictions"]) == len(normal["dataframe_records"]), body  # still serving
        assert peak[0] < 2 * 2**30, f"the server's processes reached {peak[0] / 2**30:.2f} GB"


def _big_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), (9, 9, 9)).save(buf, format="PNG")  # 160000 pixels > the 100000 limit
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_mlflow_models_predict_cli(tmp_path: Path, isolated_mlflow: str):
    uri = logged_model(tmp_path)
    registry.register(uri, "batch", {})
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64_png((220, 40, 40))]]},
                                   "params": {"tta": "5crop", "top_k": 1}}))
    out = tmp_path / "out.json"
    proc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m",
                           "models:/batch@champion", "--env-manager", "local", "-i", str(request), "-t", "json",
                           "-o", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": isolated_mlflow})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["predictions"]
    assert len(rows) == 1 and rows[0]["label"] in ("cat", "dog") and rows[0]["top_labels"] == [rows[0]["label"]]
