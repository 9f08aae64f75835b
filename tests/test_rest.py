"""A real HTTP round trip against `mlflow models serve` on 127.0.0.1 (slow: the server takes a while to start)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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


def b64_png(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_mlflow_models_serve_round_trip(tmp_path: Path, isolated_mlflow: str):
    uri = logged_model(tmp_path, max_image_pixels=100_000)
    registry.register(uri, "served", {})
    port = free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", "models:/served@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": isolated_mlflow},
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
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()


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
