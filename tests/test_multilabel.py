"""Multi-label images: a label file's `labels` column, and splits that keep every label in train."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.data.folders import MULTI, scan_folder
from finetune.errors import UserError
from finetune.evaluation import multilabel as ml
from finetune.tracking.pyfunc import load_logged_model
from finetune.workflows.export import ONNX_MODEL_NAME
from finetune.data.multilabel import iterative_parts, keep_every_label_in_first
from tests.conftest import make_multilabel_folder, tiny_train_args
from tests.test_label_files import write_csv


def test_a_labels_column_gives_each_image_its_set_of_classes(tmp_path: Path):
    folder, rows = make_multilabel_folder(tmp_path / "data")
    rows[5]["labels"] = " blue ; red;;red"  # spaces, an empty entry and a repeat do not matter
    splits = scan_folder(write_csv(folder / "labels.csv", rows, ("path", "labels")), seed=1, multi_label=True)
    assert splits.multi_label and splits.classes == ["blue", "green", "red"]
    every = splits.train + splits.val
    assert len(every) == len(rows) and len({s.path for s in every}) == len(rows)  # one sample per image
    assert all(s.label == MULTI and s.labels for s in every)
    five = next(s for s in every if s.path.endswith("img_5.png"))
    assert five.labels == (0, 2)


def test_bad_multi_label_rows_are_reported(tmp_path: Path):
    folder, rows = make_multilabel_folder(tmp_path / "data")
    rows += [{"path": "img_0.png", "labels": "red;green"},  # listed as red alone: both rows left out
             {"path": "img_4.png", "labels": ";".join(reversed(rows[4]["labels"].split(";")))},  # the same set
             {"path": "img_6.png", "labels": " ; "},  # no label
             {"path": "gone.png", "labels": "red"}]
    splits = scan_folder(write_csv(folder / "labels.csv", rows, ("path", "labels")), multi_label=True)
    why = {Path(s.path).name: s.reason for s in splits.skipped}
    assert "both rows left out" in why["img_0.png"] and "kept once" in why["img_4.png"]
    assert why["img_6.png"].endswith("empty labels") and why["gone.png"].endswith("file not found")
    used = {Path(s.path).name for s in splits.train + splits.val}
    assert "img_0.png" not in used and {"img_4.png", "img_6.png"} <= used  # img_6's first row is fine
    assert len(used) == len(rows) - 4 - 1


def test_iterative_stratification_shares_out_every_label():
    # 300 items; label 0 on every other item, label 1 on one in five, label 2 on one in ten
    sets = [tuple(lb for lb, every in enumerate((2, 5, 10)) if i % every == 0) for i in range(300)]
    items = [f"img_{i:03d}" for i in range(300)]
    train, val = iterative_parts(items, sets, [0.8, 0.2], seed=0)
    assert sorted(train + val) == items
    of = dict(zip(items, sets))
    in_val = Counter(lb for item in val for lb in of[item])
    assert abs(len(val) - 60) <= 2
    for label, total in Counter(lb for s in sets for lb in s).items():
        assert abs(in_val[label] - 0.2 * total) <= 1.5, (label, in_val[label], total)
    # deterministic and order-free; another seed deals differently
    again = iterative_parts(items[::-1], sets[::-1], [0.8, 0.2], seed=0)
    assert again == [train, val]
    assert iterative_parts(items, sets, [0.8, 0.2], seed=1) != [train, val]


@pytest.mark.parametrize("seed", range(5))
def test_every_label_keeps_an_image_in_train(seed: int):
    # rare labels: 3 and 4 on one image each, 5 on two; a 50% split would often send one of them to val only
    sets = [(0,)] * 10 + [(1,)] * 10 + [(2, 3), (4,), (5,), (5, 1)]
    items = list(range(len(sets)))
    parts = iterative_parts(items, sets, [0.5, 0.5], seed=seed, key=lambda i: f"{i:03d}")
    train, val = keep_every_label_in_first(parts, lambda i: sets[i])
    assert sorted(train + val) == items
    assert {lb for i in train for lb in sets[i]} == {0, 1, 2, 3, 4, 5}


def test_the_validation_and_selection_splits_keep_every_label_in_train(tmp_path: Path):
    folder, rows = make_multilabel_folder(tmp_path / "data", classes=("red", "green", "blue", "yellow"), n=20)
    rows.append({"path": "img_0.png", "labels": "red"})  # a repeat: fine
    splits = scan_folder(write_csv(folder / "labels.csv", rows, ("path", "labels")), val_fraction=0.5,
                         multi_label=True)
    assert {lb for s in splits.train for lb in s.labels} == set(range(4))
    inner = splits.selection(0.5, seed=0)
    assert inner.multi_label and {lb for s in inner.train for lb in s.labels} == set(range(4))
    folds = splits.folds(3, seed=0)
    assert sorted(s.path for f in folds for s in f.val) == sorted(s.path for s in splits.train)


def test_commands_that_do_not_train_on_several_labels_refuse_them_clearly(tmp_path: Path):
    folder, rows = make_multilabel_folder(tmp_path / "data")
    labels = write_csv(folder / "labels.csv", rows, ("path", "labels"))
    with pytest.raises(UserError, match="several labels per image"):
        scan_folder(labels)


# --- thresholds and metrics (finetune/evaluation/multilabel.py) --------------------------------------


@pytest.mark.parametrize("probs, positive, precision, expected, why", [
    # separable: halfway between the lowest positive (0.6) and the highest negative (0.3)
    ([0.1, 0.2, 0.3, 0.6, 0.7, 0.9], [0, 0, 0, 1, 1, 1], None, 0.45, "f1"),
    # a rare class with low probabilities: far below 0.5, which would never predict it
    ([0.01, 0.02, 0.03, 0.2, 0.25], [0, 0, 0, 1, 1], None, 0.115, "f1"),
    # overlap: best F1 takes 0.5 in (3 of 3 found, 1 false: F1 0.857) rather than stopping at 0.6 (2 of 3: 0.8)
    ([0.1, 0.5, 0.55, 0.6, 0.9], [0, 1, 0, 1, 1], None, 0.3, "f1"),
    # the same with a target precision of 1: 0.6 and above
    ([0.1, 0.5, 0.55, 0.6, 0.9], [0, 1, 0, 1, 1], 1.0, 0.575, "precision"),
    # unreachable precision: the highest threshold, and it says so
    ([0.1, 0.9, 0.8], [1, 0, 0], 1.0, 0.85, "precision: 1 not reached, the highest threshold"),
    # nothing to choose on
    ([0.1, 0.2], [0, 0], None, 0.5, "default: the selection images are all negative"),
    ([0.1, 0.2], [1, 1], None, 0.5, "default: the selection images are all positive"),
])
def test_each_class_gets_its_threshold(probs, positive, precision, expected, why):
    chosen = ml.choose_thresholds(np.array(probs)[:, None], np.array(positive)[:, None], precision)
    assert chosen.values == [pytest.approx(expected)] and chosen.chosen_by == [why]


def test_thresholds_are_per_class_and_the_sets_follow_them():
    probs = np.array([[0.9, 0.02], [0.8, 0.2], [0.2, 0.25], [0.1, 0.01]])
    truth = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    chosen = ml.choose_thresholds(probs, truth)
    assert chosen.values == [pytest.approx(0.5), pytest.approx(0.11)]
    assert ml.predict_sets(probs, chosen).tolist() == truth.astype(bool).tolist()


def test_multilabel_metrics_against_hand_counts():
    probs = np.array([[0.9, 0.1, 0.4], [0.8, 0.7, 0.1], [0.3, 0.6, 0.2], [0.2, 0.2, 0.3]])
    truth = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    m = ml.metrics(probs, truth, ml.Thresholds([0.5, 0.5, 0.5], ["f1"] * 3), ["a", "b", "c"])
    # a: found 2 of 3, no false positive; b: 1 right, 1 false (image 3); c: never positive, no AP
    assert m["per_class"]["a"]["precision"] == 1.0 and m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["precision"] == 0.5 and m["per_class"]["b"]["recall"] == 1.0
    assert m["per_class"]["c"]["ap"] is None and m["per_class"]["c"]["positives"] == 0
    assert m["precision_micro"] == pytest.approx(3 / 4) and m["recall_micro"] == pytest.approx(3 / 4)
    assert m["subset_accuracy"] == pytest.approx(2 / 4)  # images 1 and 2 exactly right
    # AP of a: positives at ranks 1, 2 and 4 of 4 -> (1 + 1 + 3/4) / 3; of b: its positive ranked first -> 1
    assert m["per_class"]["a"]["ap"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert m["map_macro"] == pytest.approx(((1 + 1 + 0.75) / 3 + 1.0) / 2)


# --- end to end: train on a label file with several labels per image, then predict ------------------------------

def train_multilabel(tmp_path: Path, weights: str, *extra: str) -> tuple[dict, Path, list[dict], str]:
    """A tiny model trained on a label file with several labels per image: its summary, the images, their rows and
    the console output."""
    folder, rows = make_multilabel_folder(tmp_path / "data", n=40)
    labels = write_csv(folder / "labels.csv", rows, ("path", "labels"))
    args = tiny_train_args(labels, tmp_path / "out", "--epochs", "2", *extra)
    args[args.index("--weights") + 1] = weights
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "out" / "summary.json").read_text()), folder, rows, result.output


def test_train_and_predict_with_several_labels_per_image(tmp_path: Path, weights_file: Path):
    # pretrained weights: the audit and the head warm-up would run (both take one label per image)
    summary, folder, rows, output = train_multilabel(tmp_path, str(weights_file), "--mixup", "0.2",
                                                     "--class-weights", "auto")
    assert summary["task"] == "multi-label" and summary["scenario"] == "large-different"
    assert summary["similarity"]["details"]["not_measured"] == "several labels per image"
    warm = summary["plan"]["warmup"]  # the one-vs-rest logistic head on cached features, scored on selection
    assert warm["c"] in (0.01, 0.1, 1.0, 10.0) and 0.0 <= warm["select"]["select_map"] <= 1.0
    assert "select_map" in summary["metrics"] and "val_map_macro" in summary["metrics"]
    assert len(summary["thresholds"]["values"]) == 3 and "label_issues" in summary["audit"]["counts"]
    spec = json.loads((tmp_path / "out" / "model" / "model.json").read_text())
    assert spec["thresholds"] == pytest.approx(summary["thresholds"]["values"], abs=1e-6)
    report = json.loads((tmp_path / "out" / "evaluation" / "val" / "report.json").read_text())
    assert set(report["per_class"]) == {"blue", "green", "red"} and report["images"] == summary["data"]["val"]
    assert "Val:        mAP" in output and "thresholds per class" in output
    # batch prediction: the labels column holds each image's set at the thresholds
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(cli, ["predict", summary["model_uri"], str(folder), "--output", str(out)])
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(out, keep_default_na=False)
    assert "labels" in pred.columns and "label" not in pred.columns and len(pred) == len(rows)
    assert all(set(v.split(";")) <= {"blue", "green", "red", ""} for v in pred["labels"])
    # the pyfunc answers with label lists and every class's probability
    model = load_logged_model(summary["model_uri"])
    frame = model.predict(None, pd.DataFrame({"image": [(folder / "img_0.png").read_bytes()]}))
    assert list(frame.columns)[0] == "labels" and set(frame.iloc[0]["probabilities"]) == {"blue", "green", "red"}


def test_a_multi_label_model_evaluates_and_exports_like_pytorch(tmp_path: Path):
    pytest.importorskip("onnxruntime", reason="the onnx extra (uv sync --extra onnx)")
    summary, folder, _, _ = train_multilabel(tmp_path, "none", "--seed", "3")
    uri = summary["model_uri"]
    # finetune evaluate on the label file: the same report as training's, in the model's class order
    result = CliRunner().invoke(cli, ["evaluate", uri, str(folder / "labels.csv"), "--output", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert 0.0 <= evaluation["metrics"]["all_map_macro"] <= 1.0 and "all_subset_accuracy" in evaluation["metrics"]
    # ONNX: the exported graph gives the same label sets and probabilities as PyTorch
    result = CliRunner().invoke(cli, ["export", uri, "--output", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "export" / "onnx" / "export.json").read_text())["fp32"]["passed"]
    images = pd.DataFrame({"image": [p.read_bytes() for p in sorted(folder.glob("*.png"))[:8]]})
    by_torch = load_logged_model(uri, {"runtime": "torch"}).predict(None, images)
    onnx_uri = f"runs:/{summary['mlflow_run_id']}/{ONNX_MODEL_NAME}"
    by_onnx = load_logged_model(onnx_uri, {"runtime": "onnx"}).predict(None, images)
    assert by_onnx["labels"].tolist() == by_torch["labels"].tolist()
    for a, b in zip(by_onnx["probabilities"], by_torch["probabilities"]):
        assert a == pytest.approx(b, abs=1e-4)
    refused = CliRunner().invoke(cli, ["export", uri, "--quantize", "int8", "--output", str(tmp_path / "e2")])
    assert refused.exit_code != 0 and "answers with several" in refused.output


def test_permuting_val_label_sets_changes_no_threshold_and_no_prediction(tmp_path: Path, isolated_mlflow: str):
    """The thresholds, like the epoch, are chosen inside train: val's label sets shuffled, the same model."""
    folder, rows = make_multilabel_folder(tmp_path / "data", n=36)
    rows = [{**r, "split": "val" if i % 4 == 0 else "train"} for i, r in enumerate(rows)]
    val = [r for r in rows if r["split"] == "val"]
    shuffled = [r["labels"] for r in val[1:] + val[:1]]
    permuted = [dict(r, labels=shuffled.pop(0)) if r["split"] == "val" else r for r in rows]
    summaries = []
    for name, table in (("plain", rows), ("permuted", permuted)):
        labels = write_csv(folder / f"{name}.csv", table, ("path", "labels", "split"))
        result = CliRunner().invoke(cli, tiny_train_args(labels, tmp_path / name, "--epochs", "2", "--seed", "3"))
        assert result.exit_code == 0, result.output
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    a, b = summaries
    assert a["thresholds"] == b["thresholds"]
    for key in ("select_map", "select_loss", "best_epoch"):
        assert a["metrics"][key] == b["metrics"][key], key
    assert (Path(a["model_dir"]) / "model.safetensors").read_bytes() == \
        (Path(b["model_dir"]) / "model.safetensors").read_bytes()
    assert a["metrics"]["val_map_macro"] != b["metrics"]["val_map_macro"]  # only what is reported differs


def test_plan_says_the_domain_is_not_measured_for_several_labels_per_image(tmp_path: Path):
    folder, rows = make_multilabel_folder(tmp_path / "data")
    labels = write_csv(folder / "labels.csv", rows, ("path", "labels"))
    result = CliRunner().invoke(cli, ["plan", str(labels), "--model", "test_resnet", "--weights", "none",
                                      "--image-size", "32", "--output", str(tmp_path / "plan")])
    assert result.exit_code == 0, result.output
    assert "Domain similarity  not measured (several labels per image)" in result.output
    assert "Scenario  large-different  (multi-label)" in result.output


def test_the_logistic_head_warm_up_reads_raw_features_as_the_classifier_does():
    from finetune.data.multilabel import macro_map
    from finetune.training.multilabel_head import fit_multilabel_head

    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.4).astype(int)
    x = rng.normal(size=(200, 8))
    x[:, :3] += 4 * y  # the first three features carry the labels
    x = x * 5 + 3  # raw features: not centred, not unit scale
    head = fit_multilabel_head(x, y, seed=0)
    probs = 1 / (1 + np.exp(-(x @ head.weight.numpy().T + head.bias.numpy())))
    assert macro_map(probs, y) > 0.95 and head.c in head.scores
    # the standardisation is folded in: the same probabilities as scikit-learn's on standardised features
    from sklearn.linear_model import LogisticRegression

    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    reference = LogisticRegression(C=head.c, max_iter=1000).fit(z, y[:, 1]).predict_proba(z)[:, 1]
    np.testing.assert_allclose(probs[:, 1], reference, atol=1e-5)


def test_the_audit_checks_label_sets(tmp_path: Path, weights_file: Path):
    """A multi-label file audited: duplicates and a flipped label set are found; the pair of a copy labelled
    differently is conflicting."""
    import shutil

    from finetune.strategy.audit import AuditTable, run_audit

    folder, rows = make_multilabel_folder(tmp_path / "data", n=60)
    shutil.copy(folder / "img_5.png", folder / "copy_5.png")
    rows.append({"path": "copy_5.png", "labels": "red;green;blue"})
    labels = write_csv(folder / "labels.csv", rows, ("path", "labels"))
    result = CliRunner().invoke(cli, ["audit", str(labels), "--model", "test_resnet", "--weights", str(weights_file),
                                      "--image-size", "32", "--output", str(tmp_path / "audit"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    pair = next(p for p in report["duplicates"] if {Path(p["a"]).name, Path(p["b"]).name} == {"img_5.png", "copy_5.png"})
    assert pair["match"] == "exact"
    assert (pair["kind"] == "conflicting") == (rows[5]["labels"] != "red;green;blue")
    # the label check on a table whose features say the classes: a flipped label set is flagged first
    rng = np.random.default_rng(0)
    sets = [tuple(sorted(rng.choice(3, size=rng.integers(1, 3), replace=False).tolist())) for _ in range(120)]
    x = rng.normal(size=(120, 6)) * 0.3
    for i, s in enumerate(sets):
        x[i, list(s)] += 3.0
    given = list(sets)
    given[7] = tuple(c for c in range(3) if c not in sets[7]) or (0,)  # the complement: clearly wrong
    table = AuditTable([f"img_{i}" for i in range(120)], np.full(120, -1), ["train"] * 120, x.astype(np.float32),
                       np.ones(120, dtype=bool), ["a", "b", "c"], given)
    audit = run_audit(table)
    assert audit.label_issues and audit.label_issues[0].path == "img_7"
    assert audit.label_issues[0].suggested == ";".join("abc"[c] for c in sets[7])
