"""A non-editable install works: the wheel, installed into a fresh venv, plans and trains from another folder.

Everything the package reads at run time (the strategy and scenario configs) must be inside the wheel; a
source checkout on the path would hide a missing file, so the commands run from a folder outside it, with
the venv's own `finetune`. Slow (about a minute: the fresh venv compiles every module it imports once);
`make test-install` runs it, and `make test` calls that after the default suite.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import make_folder, run_bounded

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "4", "--num-workers", "0"]


def uv() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not os.access(found, os.X_OK):
        pytest.skip("uv is not installed (make env installs it)")
    return found


def check(cmd: list[str], timeout: float, **kwargs) -> str:
    proc = run_bounded(cmd, timeout, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def installed_venv(tmp_path: Path) -> Path:
    """A fresh venv holding the wheel built from this checkout, with uv.lock's versions of its dependencies."""
    wheels, venv, requirements = tmp_path / "wheels", tmp_path / "venv", tmp_path / "requirements.txt"
    check([uv(), "build", "--wheel", "--out-dir", str(wheels), str(REPO)], 120)
    check([uv(), "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "--format",
           "requirements.txt", "--quiet", "-o", str(requirements)], 60, cwd=REPO)
    check([uv(), "venv", "--quiet", str(venv), "--python", f"{sys.version_info.major}.{sys.version_info.minor}"], 120)
    [wheel] = wheels.glob("finetune-*.whl")
    check([uv(), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "-r", str(requirements),
           str(wheel)], 600)
    return venv


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_venv_plans_and_trains(tmp_path: Path):
    venv = installed_venv(tmp_path)
    work = tmp_path / "elsewhere"
    make_folder(work / "images", per_class=8)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    where = check([str(venv / "bin" / "python"), "-c", "import finetune, serve; print(finetune.__file__, serve.__file__)"],
                  60, cwd=work, env=env)
    assert str(REPO) not in where and str(venv) in where  # the installed package, not this checkout

    plan = check([str(venv / "bin" / "finetune"), "plan", "images", *TINY, "--output", "plan", "--json"], 300,
                 cwd=work, env=env)
    assert '"scenario"' in plan
    train = check([str(venv / "bin" / "finetune"), "train", "images", *TINY, "--epochs", "1", "--output", "run"],
                  300, cwd=work, env=env)
    assert (work / "run" / "summary.json").is_file() and (work / "mlruns" / "mlflow.db").is_file()
    assert "finetune predict runs:/" in train
