"""Calibrated scores and the unknown answer (issue 15): the temperature, the unknown score and threshold, and
how they reach the pyfunc model and batch prediction."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from finetune.cli import cli
from finetune.evaluation.trust import ece, fit_temperature
from finetune.model.scoring import calibrated_probs, knn_score, pooled_features
from tests.conftest import TINY_MODEL, make_folder


def test_the_fitted_temperature_recovers_the_one_that_made_the_labels():
    torch.manual_seed(0)
    logits = 4.0 * torch.randn(4000, 1, 5)
    labels = torch.multinomial((logits[:, 0] / 2.5).softmax(dim=1), 1)[:, 0].numpy()  # true temperature 2.5
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    before = ece(calibrated_probs(logits, 1.0).numpy(), labels)
    after = ece(calibrated_probs(logits, t).numpy(), labels)
    assert after < before / 2


def test_few_or_all_correct_held_out_images_keep_the_temperature_near_one():
    torch.manual_seed(3)
    labels = np.arange(40) % 4
    logits = torch.randn(40, 1, 4)
    logits[torch.arange(40), 0, torch.as_tensor(labels)] += 6.0  # every image right, by a margin
    t = fit_temperature(logits, labels)  # the likelihood alone would sharpen to the end of the range
    assert 0.4 < t < 1.0


def test_calibrated_probabilities_sum_to_one_and_keep_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(50, 1, 7) * 3
    for t in (0.3, 1.0, 4.0):
        p = calibrated_probs(logits, t)
        assert torch.allclose(p.sum(dim=1), torch.ones(50), atol=1e-6)
        assert torch.equal(p.argmax(dim=1), logits[:, 0].argmax(dim=1))


def test_knn_score_is_the_distance_to_the_kth_neighbour_in_chunks(monkeypatch):
    import finetune.model.scoring as scoring

    monkeypatch.setattr(scoring, "SIMILARITY_CHUNK", 3)  # several chunks: the running top-k must stay right
    torch.manual_seed(2)
    bank = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    query = pooled_features(torch.randn(3, 5, 4))  # the centre crop of five
    for k in (1, 4):
        expected = 1 - (query @ bank.T).topk(k, dim=1).values[:, k - 1]
        assert torch.allclose(knn_score(query, bank, k), expected, atol=1e-6)


def _noise_png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return path


def _shapes_model(tmp_path: Path, weights_file: Path) -> tuple[dict, Path]:
    data = make_folder(tmp_path / "data", classes=("red", "blue", "green"), per_class=12)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["train", str(data), "--model", TINY_MODEL, "--weights", str(weights_file),
                                      "--scenario", "small-similar", "--epochs", "2", "--batch-size", "8",
                                      "--image-size", "32", "--num-workers", "0", "--tta", "center",
                                      "--output", str(out), "--register", "shapes"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text()), data


def test_noise_is_unknown_the_threshold_can_be_overridden_and_batch_prediction_has_the_columns(
        tmp_path: Path, weights_file: Path, isolated_mlflow: str):
    summary, data = _shapes_model(tmp_path, weights_file)  # one training for the pyfunc and batch checks
    assert summary["unknown"]["method"] == "knn" and summary["calibration"]["temperature"] > 0
    report = json.loads((Path(summary["output"]) / "evaluation" / "val" / "report.json").read_text())
    assert {"ece", "ece_uncalibrated", "temperature"} <= set(report["calibration"])
    assert (Path(summary["output"]) / "evaluation" / "val" / "reliability.png").exists()
    noise = [_noise_png(tmp_path / f"noise{i}.png", i).read_bytes() for i in range(3)]
    known = [p.read_bytes() for p in sorted(data.rglob("*.png"))[:6]]
    frame = pd.DataFrame({"image": known + noise})

    model = mlflow.pyfunc.load_model("models:/shapes/1")
    out = model.predict(frame)
    assert out["unknown"].tolist()[-3:] == [True, True, True]
    assert not out["unknown"][:6].any()
    assert (out["ood_score"][-3:].min() > out["ood_score"][:6].max())
    assert set(out["label"]) <= {"red", "blue", "green"}  # flagged, but the label is kept by default
    # The score is the centre crop's: the threshold holds whatever crop mode a request asks for.
    ten = model.predict(frame, params={"tta": "10crop"})
    assert ten["ood_score"].tolist() == pytest.approx(out["ood_score"].tolist(), abs=1e-5)
    # Per request: a threshold above every score keeps all; reject_unknown replaces the label.
    assert not model.predict(frame, params={"ood_threshold": 10.0})["unknown"].any()
    rejected = model.predict(frame, params={"reject_unknown": True})
    assert rejected["label"].tolist()[-3:] == ["unknown"] * 3
    # At load time (model_config): a threshold below every score flags every image.
    strict = mlflow.pyfunc.load_model("models:/shapes/1", model_config={"ood_threshold": -1.0})
    assert strict.predict(frame)["unknown"].all()
    _batch_prediction_has_the_unknown_columns_and_rejects_on_request(data, tmp_path)


def _batch_prediction_has_the_unknown_columns_and_rejects_on_request(data: Path, tmp_path: Path) -> None:
    from serve.batch_predict import predict_to_file

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _noise_png(inputs / "noise.png")
    (inputs / "red.png").write_bytes(sorted((data / "red").glob("*.png"))[0].read_bytes())
    for name, reject in (("plain.parquet", False), ("rejected.csv", True)):
        predict_to_file("models:/shapes/1", str(inputs), tmp_path / name, num_workers=0, reject_unknown=reject,
                        progress=False)
    plain = pd.read_parquet(tmp_path / "plain.parquet").set_index("path")
    rejected = pd.read_csv(tmp_path / "rejected.csv").set_index("path")
    for frame in (plain, rejected):
        assert {"ood_score", "unknown"} <= set(frame.columns)
    noise, red = str(inputs / "noise.png"), str(inputs / "red.png")
    assert str(plain.loc[noise, "unknown"]).lower() == "true" and str(plain.loc[red, "unknown"]).lower() == "false"
    assert plain.loc[noise, "label"] != "unknown" and rejected.loc[noise, "label"] == "unknown"
    assert rejected.loc[red, "label"] == "red"
