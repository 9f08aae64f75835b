"""Fixtures: tiny generated image folders, tiny timm models, an MLflow store per test."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image

TINY_MODEL = "test_resnet"  # timm's ~0.5M-parameter test net; random weights unless a file is given


def make_folder(root: Path, classes=("cat", "dog"), per_class: int = 8, size: int = 48, seed: int = 0,
                ext: str = "png") -> Path:
    """A class-folder dataset whose classes differ in colour, so a tiny model can learn them."""
    rng = random.Random(seed)
    palette = [(220, 40, 40), (40, 40, 220), (40, 200, 40), (200, 200, 40), (160, 40, 200)]
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = palette[ci % len(palette)]
            color = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in base)
            img = Image.new("RGB", (size + rng.randint(0, 8), size + rng.randint(0, 8)), color)
            img.save(d / f"{name}_{i}.{ext}")
    return root


def make_multilabel_folder(root: Path, classes=("red", "green", "blue"), n: int = 24, size: int = 48,
                           seed: int = 0) -> tuple[Path, list[dict]]:
    """Images of 1 to 3 coloured vertical bands, one colour per class (the label set: the colours shown), in one
    folder, and their label-file rows (path, labels). Every class is shown alone at least once."""
    rng = random.Random(seed)
    palette = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220), "yellow": (200, 200, 40)}
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        shown = [classes[i % len(classes)]] if i < len(classes) else rng.sample(classes, rng.randint(1, len(classes)))
        img = Image.new("RGB", (size, size), (128, 128, 128))
        band = size // len(shown)
        for j, name in enumerate(shown):
            img.paste(palette[name], (j * band, 0, (j + 1) * band, size))
        img.save(root / f"img_{i}.png")
        rows.append({"path": f"img_{i}.png", "labels": ";".join(shown)})
    return root, rows


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    """A 'pretrained' TINY_MODEL with a 10-class source head, as a local weights file."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, num_classes=10)
    path = tmp_path / "weights" / "tiny.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Creating an MLflow SQLite store runs its schema migrations (seconds): do it once, copy it."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_mlflow_db: Path) -> str:
    """Every test gets its own SQLite tracking store and runs in its own working directory."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    shutil.copyfile(_empty_mlflow_db, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return uri


def tiny_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(data), "--model", TINY_MODEL, "--weights", "none", "--epochs", "1",
            "--batch-size", "4", "--image-size", "32", "--num-workers", "0", "--output", str(out), *extra]


def run_bounded(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command (text output captured) in a process group of its own, all of it killed after `timeout`.

    Lightning's ddp launches the other ranks as children of rank 0: a plain `subprocess.run(timeout=)`
    would kill rank 0 only and leave a rank waiting on gloo (30 minutes by default) on the CI's cores.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)  # EOF only when every rank has exited
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[1:3])} did not finish within its limit of {timeout:g}s\n"
                    f"{out[-2000:]}\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind by a failed rank 0
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
