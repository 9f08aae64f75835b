"""Does this interpreter's MLflow do what finetune needs? No torch, seconds; exits non-zero on the first failure.

bench/gpu_check.sh runs it right after installing .whl/ on the GPU machine, so a wheel missing from
`make gpu-wheels` shows up as one clear error instead of a failing test suite. What it does, in a
temporary SQLite store: create an experiment and a run, log params/metrics/an artifact, search runs,
log a pyfunc model with a signature (with params) and an input example, register it and set an alias,
load it back by `models:/NAME@ALIAS` and predict.

    python3 -m bench mlflow_smoke
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """No options (`--help` aside): the check, and on failure one line that says what is missing, then the
    traceback."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    try:
        check()
    except Exception as e:
        print(f"mlflow smoke check FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        raise


def check() -> None:
    import mlflow
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.tracking import MlflowClient
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            k = (params or {}).get("k", 1)
            return pd.DataFrame({"label": ["x"] * len(model_input), "score": [float(k)] * len(model_input)})

    work = Path(tempfile.mkdtemp(prefix="mlflow-smoke-"))
    uri = f"sqlite:///{work}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("smoke", artifact_location=(work / "artifacts").as_uri())
    (work / "note.txt").write_text("artifact")
    example = pd.DataFrame({"image": [b"\x89PNG"]})
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                               outputs=infer_signature(model_output=Echo().predict(None, example)).outputs,
                               params=ParamSchema([ParamSpec("k", "long", 1)]))
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({"a": 1, "b": "two"})
        mlflow.log_metric("val_acc", 0.5, step=1)
        mlflow.log_artifact(str(work / "note.txt"))
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), signature=signature,
                                       input_example=example, pip_requirements=["pandas"])
    found = client.search_runs([experiment_id], "metrics.val_acc > 0.1")
    assert [r.info.run_id for r in found] == [run.info.run_id], found
    version = mlflow.register_model(info.model_uri, "smoke").version
    client.set_registered_model_alias("smoke", "champion", version)
    model = mlflow.pyfunc.load_model("models:/smoke@champion")
    out = model.predict(pd.DataFrame({"image": [b"a", b"b"]}), params={"k": 3})
    assert len(out) == 2 and out["score"].tolist() == [3.0, 3.0], out
    print(f"mlflow {mlflow.__version__} ok: sqlite store, run, search, pyfunc log/register/load/predict "
          f"({os.path.dirname(mlflow.__file__)})")
