"""A request to the pyfunc model is bounded: rows, image bytes, crops held at once, and every bad field a 400."""

from __future__ import annotations

import io

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from finetune.errors import UserError
from finetune.tracking import pyfunc
from finetune.tracking.pyfunc import BadRequest
from tests.model_helpers import logged_model


def png_bytes(color=(200, 30, 30), size=(40, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def frame(n: int, color=(200, 30, 30)) -> pd.DataFrame:
    return pd.DataFrame({"image": [png_bytes(color)] * n})


def test_row_limit_default_configured_and_from_the_environment(tmp_path, monkeypatch):
    uri = logged_model(tmp_path)
    logged = mlflow.models.get_model_info(uri).flavors["python_function"]["config"]
    assert logged["max_request_rows"] == 256 and logged["max_request_bytes"] == 32 * 2**20  # the MLmodel says so

    model = mlflow.pyfunc.load_model(uri)
    with pytest.raises(BadRequest, match=r"257 rows, more than the limit of 256 rows.*FINETUNE_MAX_REQUEST_ROWS"):
        model.predict(pd.DataFrame({"image": [b"not decoded: refused first"] * 257}))

    small = mlflow.pyfunc.load_model(uri, model_config={"max_request_rows": 3})
    assert len(small.predict(frame(3))) == 3
    with pytest.raises(BadRequest, match="4 rows, more than the limit of 3 rows.*max_request_rows"):
        small.predict(frame(4))

    monkeypatch.setenv("FINETUNE_MAX_REQUEST_ROWS", "2")
    with pytest.raises(BadRequest, match="more than the limit of 2 rows"):
        mlflow.pyfunc.load_model(uri).predict(frame(3))


def test_byte_limit_counts_image_bytes_and_the_files_paths_name(tmp_path, monkeypatch):
    uri = logged_model(tmp_path)
    size = len(png_bytes())
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    model = mlflow.pyfunc.load_model(uri, model_config={"max_request_bytes": 2 * size, "path_root": str(root)})
    assert len(model.predict(frame(2))) == 2
    with pytest.raises(BadRequest, match=rf"more than the limit of {2 * size} bytes.*FINETUNE_MAX_REQUEST_BYTES"):
        model.predict(frame(3))
    with pytest.raises(BadRequest, match=rf"limit of {2 * size} bytes"):
        model.predict(pd.DataFrame({"path": ["a.png"] * 3}))

    monkeypatch.setenv("FINETUNE_MAX_REQUEST_BYTES", str(size))
    with pytest.raises(BadRequest, match=rf"limit of {size} bytes"):
        mlflow.pyfunc.load_model(uri).predict(frame(2))
    monkeypatch.setenv("FINETUNE_MAX_REQUEST_BYTES", "lots")
    with pytest.raises(UserError, match="FINETUNE_MAX_REQUEST_BYTES or model_config max_request_bytes must be"):
        mlflow.pyfunc.load_model(uri)


def test_10crop_holds_one_batch_of_crops_at_a_time(tmp_path, monkeypatch):
    uri = logged_model(tmp_path)
    model = mlflow.pyfunc.load_model(uri)
    served = model.unwrap_python_model()
    colors = [(20 * i, 200 - 15 * i, 40) for i in range(13)]
    images = pd.DataFrame({"image": [png_bytes(c) for c in colors]})
    served.batch_size = 1  # the reference: one crop per forward pass
    expected = model.predict(images, params={"tta": "10crop"})

    held, passes = [], []
    real = pyfunc.score_views

    def recording(net, views, *args, **kwargs):
        held.append(views.shape[0] * views.shape[1])
        return real(net, views, *args, **kwargs)

    monkeypatch.setattr(pyfunc, "score_views", recording)
    first_conv = next(m for m in served.net.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    served.batch_size = 24
    got = model.predict(images, params={"tta": "10crop"})
    assert max(held) <= 24 and max(passes) <= 24  # 2 images' 10 crops at a time, not 13 images' 130
    assert sum(held) == 130 and sum(passes) == 130
    assert got["label"].tolist() == expected["label"].tolist()
    assert got["score"].tolist() == pytest.approx(expected["score"].tolist(), abs=1e-5)

    held.clear()
    served.batch_size = 4  # fewer crops than one image has: one image at a time
    model.predict(images[:3], params={"tta": "10crop"})
    assert held == [10, 10, 10]


def test_every_bad_field_is_a_bad_request(tmp_path, monkeypatch):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    model = mlflow.pyfunc.load_model(logged_model(tmp_path), model_config={"path_root": str(root)})
    with pytest.raises(BadRequest, match="NUL byte"):
        model.predict(pd.DataFrame({"path": ["a.png\x00.txt"]}))
    served = model.unwrap_python_model()
    with pytest.raises(BadRequest, match="not a usable file path"):  # a lone surrogate: valid JSON, no file name
        served.predict(None, pd.DataFrame({"path": pd.Series(["a\ud800.png"], dtype=object)}))
    one = frame(1)
    bad = [({"path": [3]}, None, "'path' column must hold text, not int"),
           ({"image": [3.5]}, None, "must hold image bytes, not float"),
           ({"image": ["@@not base64@@"]}, None, "base64"),
           (None, {"tta": ["10crop"]}, "Invalid tta"),
           (None, {"top_k": "two"}, "top_k must be an integer"),
           (None, {"top_k": 1.5}, "top_k must be an integer"),
           (None, {"top_k": 0}, "top_k must be at least 1"),
           (None, {"ood_threshold": "nan"}, "ood_threshold must be a finite number"),
           (None, {"ood_threshold": True}, "ood_threshold must be a finite number"),
           (None, {"reject_unknown": "maybe"}, "reject_unknown must be true or false"),
           (None, "tta=10crop", "params must be an object")]
    for columns, params, message in bad:
        with pytest.raises(BadRequest, match=message):
            served.predict(None, pd.DataFrame(columns) if columns else one, params)
    with pytest.raises(BadRequest, match="must be a table of rows"):
        served.predict(None, {"image": [b"a", b"b"], "path": ["x"]})

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(served, "predict_scores", broken)
    with pytest.raises(MlflowException, match="internal error") as raised:
        served.predict(None, one)
    assert raised.value.error_code == "INTERNAL_ERROR" and raised.value.__cause__ is None
