"""Labels from a CSV file (`finetune train LABELS.csv`): the same splits as the folder, every bad row reported."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.data.folders import iter_image_files, scan_folder
from finetune.errors import UserError
from tests.conftest import make_folder, tiny_train_args

SHARED = Path(__file__).resolve().parents[2] / "shared"


def write_csv(path: Path, rows: list[dict], columns=("path", "label")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows_of(folder: Path, with_split: bool = False) -> list[dict]:
    """One row per image of a folder (class folders, or split folders with `with_split`), paths relative to it."""
    rows = []
    for image in sorted(folder.rglob("*.png")):
        rel = image.relative_to(folder)
        row = {"path": str(rel), "label": rel.parts[-2]}
        if with_split:
            row["split"] = rel.parts[0]
        rows.append(row)
    return rows[::-1]  # row order must not matter


def same_splits(a, b) -> None:
    assert a.classes == b.classes
    for split in ("train", "val", "test"):
        assert [(s.path, s.label) for s in getattr(a, split)] == [(s.path, s.label) for s in getattr(b, split)]


def test_a_label_file_gives_the_folders_classes_and_split(tmp_path: Path):
    folder = make_folder(tmp_path / "data", classes=("cat", "dog", "fox"), per_class=6)
    labels = write_csv(folder / "labels.csv", rows_of(folder))
    by_file, by_folder = scan_folder(labels, seed=3), scan_folder(folder, seed=3)
    same_splits(by_file, by_folder)
    assert by_file.layout == "csv" and by_file.skipped == []


def test_a_split_column_is_the_users_split(tmp_path: Path):
    root = tmp_path / "data"
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        make_folder(root / split, per_class=n, seed=len(split))
    labels = write_csv(tmp_path / "labels.csv", [{**r, "path": f"data/{r['path']}"} for r in rows_of(root, True)],
                       columns=("path", "label", "split"))
    by_file = scan_folder(labels)
    same_splits(by_file, scan_folder(root))
    assert by_file.layout == "csv-splits" and len(by_file.test) == 4


def test_every_bad_row_is_reported_and_the_good_rows_are_used(tmp_path: Path):
    folder = make_folder(tmp_path / "data", per_class=4)
    good = rows_of(folder)
    cat0, dog0 = "cat/cat_0.png", "dog/dog_0.png"
    rows = [{**r, "split": ""} for r in good] + [
        {"path": "cat/missing.png", "label": "cat", "split": ""},  # no such file
        {"path": "cat/cat_1.png", "label": "", "split": ""},  # empty label (the file is listed above as well)
        {"path": "dog/dog_1.png", "label": "dog", "split": "holdout"},  # unknown split
        {"path": cat0, "label": "dog", "split": ""},  # listed as cat above: both rows left out
        {"path": dog0, "label": "dog", "split": "train"},  # repeats a row above ("" is train): kept once
        {"path": "", "label": "cat", "split": ""},
    ]
    splits = scan_folder(write_csv(folder / "labels.csv", rows, ("path", "label", "split")))
    reasons = {(Path(s.path).name, s.reason.split(": ", 1)[-1]) for s in splits.skipped}
    assert ("missing.png", "file not found") in reasons
    assert ("cat_1.png", "empty label") in reasons
    assert ("dog_1.png", "unknown split 'holdout' (train, val or test)") in reasons
    assert any(name == "cat_0.png" and "both rows left out" in why for name, why in reasons)
    assert any(name == "dog_0.png" and "kept once" in why for name, why in reasons)
    assert any(s.path == f"row {len(rows) + 1}" and s.reason == "no path" for s in splits.skipped)
    assert len(splits.skipped) == 6
    used = {Path(s.path).name for s in splits.train + splits.val}
    assert "cat_0.png" not in used and {"dog_0.png", "cat_1.png", "dog_1.png"} <= used
    assert len(used) == 7  # 8 images, cat_0 left out; dog_0 once


@pytest.mark.parametrize("columns, message", [
    (("path", "label", "labels"), "both a 'label' and a 'labels' column"),
    (("file", "label"), "needs the columns path and label"),
    (("path",), "needs the columns path and label"),
])
def test_a_label_file_without_the_columns_is_refused(tmp_path: Path, columns, message):
    make_folder(tmp_path / "data")
    labels = write_csv(tmp_path / "data" / "labels.csv", [dict.fromkeys(columns, "x")], columns)
    with pytest.raises(UserError, match=message):
        scan_folder(labels)


def test_train_takes_a_label_file_and_names_the_run_after_it(tmp_path: Path):
    folder = make_folder(tmp_path / "data")
    labels = write_csv(folder / "labels.csv", rows_of(folder))
    result = CliRunner().invoke(cli, tiny_train_args(labels, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"]["layout"] == "csv" and summary["data"]["train"] + summary["data"]["val"] == 16
    # the run's file list is relative to the label file's folder, like a data folder's
    listed = (tmp_path / "out" / "files.json").read_text()
    assert "cat/cat_0.png" in listed and ".." not in listed
    from mlflow.tracking import MlflowClient

    run_name = MlflowClient().get_run(summary["mlflow_run_id"]).info.run_name
    assert run_name.split("-")[1] == "labels"  # named after the file, without .csv


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "hymenoptera").is_dir() or not (SHARED / "weights").is_dir(),
                    reason="needs ../shared")
def test_a_label_file_predicts_exactly_as_the_folder_on_hymenoptera(tmp_path: Path):
    """The same images, split and seed through a CSV and through the folder: the same predictions on val."""
    data = SHARED / "data" / "hymenoptera"
    rows = [{"path": os.path.relpath(p, data), "label": Path(p).parent.name, "split": Path(p).parent.parent.name}
            for p in iter_image_files(data)]  # every image file the folder scan reads
    labels = write_csv(tmp_path / "labels.csv", [{**r, "path": str(data / r["path"])} for r in rows],
                       ("path", "label", "split"))
    args = ["--model", "mobilenetv2_100", "--weights", str(SHARED / "weights" / "mobilenetv2_100.coral_in1k.safetensors"),
            "--image-size", "96", "--epochs", "1", "--num-workers", "0", "--scenario", "small-similar", "--tta", "center"]
    preds = {}
    for name, source in (("folder", data), ("csv", labels)):
        result = CliRunner().invoke(cli, ["train", str(source), "--output", str(tmp_path / name), *args])
        assert result.exit_code == 0, result.output
        frame = pd.read_csv(tmp_path / name / "evaluation" / "val" / "predictions.csv")
        preds[name] = frame.assign(path=frame["path"].map(lambda p: os.path.basename(p))).sort_values("path")
    assert len(preds["csv"]) == 153
    assert json.loads((tmp_path / "csv" / "summary.json").read_text())["data"]["train"] == 245
    pd.testing.assert_frame_equal(preds["csv"].reset_index(drop=True), preds["folder"].reset_index(drop=True))
