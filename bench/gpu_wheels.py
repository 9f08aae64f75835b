"""Download into .whl/ the wheels the offline GPU machine lacks (`make gpu-wheels`), at uv.lock's versions.

The GPU machine's python3 (3.12, /opt/torch/.venv) has torch, Lightning, timm, torchvision, pandas,
scikit-learn, matplotlib, pyarrow, ... but no MLflow (see /work/.library/device/KINDS.md, "Python
packages already there"). `finetune` imports MLflow at runtime, so MLflow and the part of its
dependency tree the machine lacks travel as wheels: CPython 3.12, manylinux x86_64, one version each,
the version uv.lock pins. bench/gpu_check.sh installs them there with
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.

Only what `finetune` needs: import `mlflow` / `mlflow.pyfunc`, create runs and log metrics in a SQLite
store, log, load and predict with the pyfunc model. `import mlflow` needs fastapi/starlette and the
databricks-sdk package, and the SQLite registry needs cryptography (with cffi), so those are in.
MLflow's server-side requirements (flask, gunicorn, graphene, huey, docker, skops, uvicorn for
`mlflow models serve`, gitpython for the source-version tag) are left out: MLflow imports them lazily,
and the check imports and runs the model without them. `optuna` (only `finetune sweep`) is left out too.

    python3 -m bench gpu_wheels            # download (pip download --no-deps ...), prune, print sizes
    python3 -m bench gpu_wheels --list     # the NAME==VERSION list only
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from bench.common import ROOT

# Missing on the GPU machine and needed at runtime (why, in the comment).
NAMES = [
    "mlflow",                  # the `mlflow` distribution itself (no extra modules beyond skinny; gives
                               # importlib.metadata.version("mlflow") for the logged model's pins)
    "mlflow-skinny",           # the Python package `mlflow`
    "mlflow-tracing",          # imported by `import mlflow`
    "sqlalchemy",              # the SQLite tracking/registry store
    "alembic",                 # its schema migrations (run when a store is created)
    "mako",                    # alembic's templates (imported by alembic)
    "sqlparse",                # MLflow's search filter parser (search_runs, registry lookups)
    "cachetools",              # mlflow-tracing
    "opentelemetry-api",       # mlflow-tracing, imported by `import mlflow`
    "opentelemetry-sdk",
    "opentelemetry-proto",
    "opentelemetry-semantic-conventions",
    "importlib-metadata",      # opentelemetry-api
    "pydantic",                # MLflow entities and model signatures
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "python-dotenv",           # mlflow-skinny
    "fastapi",                 # imported by `import mlflow` (mlflow.gateway.utils, via mlflow.genai)
    "starlette",               # fastapi
    "databricks-sdk",          # `import mlflow` asks find_spec("databricks.agents"), which needs the
                               # `databricks` package to exist
    "cryptography",            # the SQLite registry store's models import cryptography.fernet
    "cffi",                    # cryptography's bindings load _cffi_backend (pycparser only to compile: left out)
]

PIP_DOWNLOAD = ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
                "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                "--platform", "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path = ROOT / "uv.lock") -> dict[str, str]:
    with open(lock, "rb") as f:
        return {norm(p["name"]): p["version"] for p in tomllib.load(f)["package"]}


def pins() -> list[str]:
    versions = locked_versions()
    missing = [n for n in NAMES if norm(n) not in versions]
    if missing:
        raise SystemExit(f"not in uv.lock: {', '.join(missing)} (update NAMES in {Path(__file__).name})")
    return [f"{n}=={versions[norm(n)]}" for n in NAMES]


def wheel_dist(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return norm(name), version


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(ROOT / ".whl"))
    parser.add_argument("--list", action="store_true", help="print NAME==VERSION and exit")
    parser.add_argument("--python", default=sys.executable, help="whose pip downloads (default: this python)")
    args = parser.parse_args(argv)
    wanted = pins()
    if args.list:
        print("\n".join(wanted))
        return
    dest = Path(args.dest)
    dest.mkdir(exist_ok=True)
    subprocess.run([args.python, "-m", "pip", "-q", *PIP_DOWNLOAD, "-d", str(dest), *wanted], check=True)
    # One version of each package, and nothing that is not on the list (two versions stop pip install).
    keep = {norm(p.split("==")[0]): p.split("==")[1] for p in wanted}
    for whl in sorted(dest.glob("*.whl")):
        name, version = wheel_dist(whl)
        if keep.get(name) != version:
            print(f"removing {whl.name}: not {name}=={keep.get(name)}")
            whl.unlink()
    wheels = sorted(dest.glob("*.whl"))
    got = {wheel_dist(w)[0] for w in wheels}
    if got != set(keep):
        raise SystemExit(f"missing wheels: {sorted(set(keep) - got)}")
    total = 0
    for whl in wheels:
        size = whl.stat().st_size
        total += size
        print(f"{size / 2**20:7.2f} MiB  {whl.name}")
    print(f"{total / 2**20:7.2f} MiB  total, {len(wheels)} wheels in {dest}")
