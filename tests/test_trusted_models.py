"""Loading a model runs its code: `load_logged_model` refuses, before MLflow loads anything, a model that is
not finetune's models-from-code (a pickle, another code file, code folders)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import timm
from mlflow.pyfunc import PythonModel

from finetune import tracking
from finetune.errors import UserError
from finetune.model.artifact import ModelSpec, save_model
from finetune.tracking.pyfunc import MODEL_DIR_ARTIFACT, ImageClassifierModel, load_logged_model
from tests.conftest import TINY_MODEL
from tests.model_helpers import DATA_CONFIG, logged_model

MARKER_ENV = "FINETUNE_TEST_MARKER"


class Unpickled(PythonModel):
    """Leaves a file behind when it is unpickled: proof that a pickle was loaded."""

    def __setstate__(self, state):
        import os

        if os.environ.get(MARKER_ENV):
            Path(os.environ[MARKER_ENV]).write_text("unpickled")
        self.__dict__.update(state)

    def predict(self, context, model_input, params=None):
        return model_input


FOREIGN_CODE = """import os
from pathlib import Path

from mlflow.models import set_model

from finetune.tracking.pyfunc import ImageClassifierModel

if os.environ.get("FINETUNE_TEST_MARKER"):
    Path(os.environ["FINETUNE_TEST_MARKER"]).write_text("ran")
set_model(ImageClassifierModel())
"""


def log_other(tmp_path: Path, python_model) -> str:
    """A model logged with the same artifacts as finetune's, but another python_model."""
    net = timm.create_model(TINY_MODEL, pretrained=False, num_classes=2)
    spec = ModelSpec(architecture=TINY_MODEL, num_classes=2, class_names=["cat", "dog"], data_config=DATA_CONFIG)
    model_dir = save_model(tmp_path / "other-model", net, spec)
    with mlflow.start_run(run_id=tracking.client().create_run(tracking.ensure_experiment("test")).info.run_id):
        return mlflow.pyfunc.log_model(name="model", python_model=python_model,
                                       artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
                                       pip_requirements=["mlflow"]).model_uri


def test_finetune_models_load(tmp_path):
    assert isinstance(load_logged_model(logged_model(tmp_path)), ImageClassifierModel)


def test_a_pickled_model_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    uri = log_other(tmp_path, Unpickled())
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # what MLflow would otherwise refuse
    with pytest.raises(UserError, match=r"Refusing to load .*no finetune code file \(model_code.py.*"
                                        r"it carries a pickle \(python_model.pkl\)"):
        load_logged_model(uri)
    assert not marker.exists()


@pytest.mark.parametrize("file_name", ["serve.py", "model_code.py"])
def test_a_foreign_code_file_is_refused_before_it_runs(tmp_path, monkeypatch, file_name):
    code = tmp_path / "code" / file_name
    code.parent.mkdir()
    code.write_text(FOREIGN_CODE)
    uri = log_other(tmp_path, str(code))
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    expected = ("its python_function flavor has no finetune code file" if file_name == "serve.py"
                else "its model_code.py is not finetune's")
    with pytest.raises(UserError, match=f"Refusing to load {uri}: {expected}"):
        load_logged_model(uri)
    assert not marker.exists()
