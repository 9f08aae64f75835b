"""Val is never used for a choice: train twice with the same seed, once with val's labels permuted (its class
folders swapped). Every choice (epochs, weights, weight decay, warm-up or fine-tuned, crop mode) is made on
data inside train, so the two models predict identically; only the reported val numbers differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.evaluation.tta import AUTO_CANDIDATES, mode_scores, pick_mode, source_outputs
from finetune.model.artifact import load_model, load_scoring
from tests.conftest import TINY_MODEL, make_folder


def _split_folder(root: Path, swap_val: bool) -> Path:
    """train/{cat,dog} (the same images in both copies) and val/{cat,dog}, the two val folders swapped."""
    make_folder(root / "train", per_class=14, seed=1)
    make_folder(root / "val", per_class=5, seed=2)
    if swap_val:
        (root / "val" / "cat").rename(root / "val" / "tmp")
        (root / "val" / "dog").rename(root / "val" / "cat")
        (root / "val" / "tmp").rename(root / "val" / "dog")
    return root


def _train(data: Path, out: Path, weights: Path, scenario: str) -> dict:
    args = ["train", str(data), "--model", TINY_MODEL, "--weights", str(weights), "--scenario", scenario,
            "--epochs", "2", "--batch-size", "4", "--image-size", "32", "--num-workers", "0", "--seed", "3",
            "--output", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("scenario", ["small-similar", "large-similar"])
def test_permuting_val_labels_changes_no_choice_and_no_prediction(tmp_path: Path, weights_file: Path,
                                                                  isolated_mlflow: str, scenario: str):
    plain = _split_folder(tmp_path / "plain", swap_val=False)
    swapped = _split_folder(tmp_path / "swapped", swap_val=True)
    a = _train(plain, tmp_path / "out-a", weights_file, scenario)
    b = _train(swapped, tmp_path / "out-b", weights_file, scenario)

    # The same choices, made on the same data inside train ...
    assert a["tta"] == b["tta"]
    assert a["calibration"] == b["calibration"] and a["unknown"] == b["unknown"]  # temperature, unknown threshold
    for key in ("select_acc", "select_loss", "best_epoch", "epochs", "weights"):
        assert a["metrics"].get(key) == b["metrics"].get(key), key
    assert a["plan"].get("weight_decay") == b["plan"].get("weight_decay")
    # ... give the same model: identical predictions on every image of both splits.
    images = sorted(str(p) for p in plain.rglob("*.png"))
    probs, ood = [], []
    for summary in (a, b):
        net, spec = load_model(summary["model_dir"])
        scoring = load_scoring(summary["model_dir"], spec)
        out = source_outputs(net.eval(), images, spec.data_config, summary["tta"]["mode"])
        probs.append(scoring.probs(out.logits).numpy())
        ood.append(scoring.ood_score(out.features).numpy())
    np.testing.assert_array_equal(probs[0], probs[1])
    np.testing.assert_array_equal(ood[0], ood[1])
    assert not np.isnan(ood[0]).any()
    # Only the reported val numbers differ (val's labels were swapped: accuracy a -> 1 - a).
    assert a["metrics"]["val_acc"] == pytest.approx(1.0 - b["metrics"]["val_acc"])
    assert "select_*" in a["metric_sources"] and "read once" in a["metric_sources"]["val_*"]


def test_tta_auto_picks_the_best_mode_and_ties_go_to_fewer_crops():
    labels = np.array([0, 1, 0, 1])
    per_view = np.full((4, 10, 2), 0.5)
    for i, y in enumerate(labels):
        per_view[i, :, y] = 0.9  # every view right ...
        per_view[i, :, 1 - y] = 0.1
    scores = mode_scores(per_view, labels)
    assert {m: s["acc"] for m, s in scores.items()} == {"center": 1.0, "5crop": 1.0, "10crop": 1.0}
    assert pick_mode(scores) == "center"  # a tie: the cheapest mode
    per_view[0, AUTO_CANDIDATES["center"], 0] = 0.2  # ... but the centre crop of image 0 wrong
    per_view[0, AUTO_CANDIDATES["center"], 1] = 0.8
    scores = mode_scores(per_view, labels)
    assert scores["center"]["acc"] == 0.75 and scores["5crop"]["acc"] == 1.0
    assert pick_mode(scores) == "5crop"


def test_the_chosen_crop_mode_travels_with_the_model(tmp_path: Path, weights_file: Path, isolated_mlflow: str):
    data = make_folder(tmp_path / "data", per_class=10)
    out = tmp_path / "out"
    args = ["train", str(data), "--model", TINY_MODEL, "--weights", str(weights_file), "--scenario", "small-similar",
            "--epochs", "2", "--batch-size", "4", "--image-size", "32", "--num-workers", "0", "--output", str(out),
            "--register", "picked"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta"]["mode"] in AUTO_CANDIDATES and summary["tta"]["chosen_by"].startswith("auto")
    _, spec = load_model(out / "model")
    assert spec.default_tta == summary["tta"]["mode"]
    import mlflow

    model = mlflow.pyfunc.load_model("models:/picked/1")
    assert model.metadata.get_params_schema().to_dict()[0]["default"] == summary["tta"]["mode"]
    # An explicit --tta still wins.
    shutil.rmtree(out)
    result = CliRunner().invoke(cli, [*args[:-2], "--tta", "10crop"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["tta"] == {"mode": "10crop", "chosen_by": "--tta"}
    assert load_model(out / "model")[1].default_tta == "10crop"
