"""Loading and running a logged model (the pyfunc model, batch prediction) never imports Lightning.

Checked in a fresh interpreter: the test process itself has imported Lightning through other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_folder

REPO = Path(__file__).resolve().parents[1]

# Each stage reports which Lightning packages are imported once it is done, so a failure names the
# stage that brought Lightning in.
SCRIPT = r"""
import io, json, sys
from pathlib import Path

LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")

def imported():
    return sorted(m for m in LIGHTNING if m in sys.modules)

tmp, images = Path(sys.argv[1]), Path(sys.argv[2])
report = {}

from tests.model_helpers import logged_model
uri = logged_model(tmp)
report["log_model"] = imported()

import mlflow
import pandas as pd
model = mlflow.pyfunc.load_model(uri)
png = next(images.rglob("*.png")).read_bytes()
preds = model.predict(pd.DataFrame({"image": [png, png]}))
report["pyfunc_predictions"] = list(preds["label"])
report["pyfunc"] = imported()

from serve.batch_predict import predict_to_file
result = predict_to_file(uri, images, tmp / "preds.csv", num_workers=0, progress=False)
report["batch_predicted"] = result["predicted"]
report["batch_predict"] = imported()
print("REPORT " + json.dumps(report))
"""


def test_loading_and_predicting_does_not_import_lightning(tmp_path: Path):
    images = make_folder(tmp_path / "images", per_class=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(images)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    assert report["pyfunc_predictions"] and set(report["pyfunc_predictions"]) <= {"cat", "dog"}
    assert report["batch_predicted"] == 4
    frame = (tmp_path / "preds.csv").read_text().splitlines()
    assert len(frame) == 5 and all(",cat," in row or ",dog," in row for row in frame[1:])
    assert report["log_model"] == [], "logging the model imported Lightning"
    assert report["pyfunc"] == [], "loading or predicting with the pyfunc model imported Lightning"
    assert report["batch_predict"] == [], "batch prediction (one process) imported Lightning"
