"""Scanning image folders: layouts, splits, nested folders, unreadable files, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from finetune.cli import cli
from finetune.data.folders import scan_folder, stratified_folds, stratified_split
from finetune.data.images import load_rgb
from finetune.errors import UserError
from tests.conftest import make_folder, tiny_train_args


def test_class_folder_split_is_stratified_and_deterministic(tmp_path: Path):
    make_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=10)
    s1 = scan_folder(tmp_path / "d", val_fraction=0.3, seed=1)
    s2 = scan_folder(tmp_path / "d", val_fraction=0.3, seed=1)
    s3 = scan_folder(tmp_path / "d", val_fraction=0.3, seed=2)
    assert s1.layout == "class-folders"
    assert s1.classes == ["a", "b", "c"]
    assert [s.path for s in s1.val] == [s.path for s in s2.val]
    assert [s.path for s in s1.val] != [s.path for s in s3.val]
    for label in range(3):
        assert sum(s.label == label for s in s1.val) == 3
        assert sum(s.label == label for s in s1.train) == 7
    assert not {s.path for s in s1.train} & {s.path for s in s1.val}


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_split_folder_layout_with_test(tmp_path: Path, val_name: str):
    make_folder(tmp_path / "d" / "train", per_class=4)
    make_folder(tmp_path / "d" / val_name, per_class=2)
    make_folder(tmp_path / "d" / "test", per_class=3)
    splits = scan_folder(tmp_path / "d")
    assert splits.layout == "split-folders"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 6)


def test_nested_class_folders_are_found(tmp_path: Path):
    for cls in ("greek", "latin"):
        for char in ("c1", "c2"):
            make_folder(tmp_path / "d" / cls, classes=(char,), per_class=3)
    splits = scan_folder(tmp_path / "d", val_fraction=0.34)
    assert splits.classes == ["greek", "latin"]
    assert len(splits.train) + len(splits.val) == 12


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path):
    root = make_folder(tmp_path / "d", per_class=5)
    (root / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "dog" / "empty.png").write_bytes(b"")
    good = Image.new("RGB", (64, 64), "red")
    good.save(root / "dog" / "truncated.jpg")
    data = (root / "dog" / "truncated.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    splits = scan_folder(root)
    assert len(splits.train) + len(splits.val) == 10
    assert sorted(Path(s.path).name for s in splits.skipped) == ["broken.jpg", "empty.png", "truncated.jpg"]
    assert "skipped 3 unreadable file(s)" in splits.skipped_report()


def test_training_reports_and_logs_skipped_files(image_folder: Path, tmp_path: Path, isolated_mlflow: str):
    (image_folder / "cat" / "bad.jpg").write_bytes(b"garbage")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, tiny_train_args(image_folder, out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["skipped"] == 1
    assert summary["skipped_files"][0].endswith("bad.jpg")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(isolated_mlflow)
    local = client.download_artifacts(summary["mlflow_run_id"], "skipped_files.json", str(tmp_path))
    report = json.loads(Path(local).read_text())
    assert report["count"] == 1 and report["files"][0]["path"].endswith("bad.jpg")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda r: r.mkdir(), "No classes in"),
        (lambda r: make_folder(r, classes=("only",)), "at least 2 classes"),
        (lambda r: (make_folder(r), (r / "empty").mkdir()), "empty"),
        (lambda r: (make_folder(r), (r / "junk").mkdir(), (r / "junk" / "x.jpg").write_bytes(b"no")),
         "all 1 image file(s) in it are unreadable"),
    ],
    ids=["empty-folder", "one-class", "empty-class", "all-corrupt-class"],
)
def test_unusable_folders_fail_with_message_and_no_traceback(tmp_path: Path, setup, message: str):
    root = tmp_path / "d"
    setup(root)
    result = CliRunner().invoke(cli, tiny_train_args(root, tmp_path / "out"))
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "summary.json").exists()


def test_missing_data_folder(tmp_path: Path):
    result = CliRunner().invoke(cli, tiny_train_args(tmp_path / "nope", tmp_path / "out"))
    assert result.exit_code == 2
    assert "Data folder not found" in result.output


def test_image_modes_convert_to_rgb(tmp_path: Path):
    # 16-bit grayscale keeps its full range (Pillow's plain convert would clip at 255).
    arr16 = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(arr16).save(tmp_path / "g16.png")
    assert load_rgb(tmp_path / "g16.png").getpixel((0, 0)) == (128, 128, 128)
    # RGBA: transparent pixels become white, opaque ones keep their colour.
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    img = load_rgb(tmp_path / "a.png")
    assert img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((0, 0)) == (0, 0, 255)
    # CMYK JPEG and palette PNG come out RGB.
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_rgb(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    Image.new("RGB", (8, 8), (0, 200, 0)).convert("P").save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").mode == "RGB"


def test_exif_orientation_is_honoured(tmp_path: Path):
    img = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)


def test_stratified_split_keeps_singletons_in_train():
    from finetune.data.folders import Sample

    samples = [Sample("a0", 0), Sample("b0", 1), Sample("b1", 1)]
    train, val = stratified_split(samples, 0.5, 0)
    assert [s.path for s in val if s.label == 0] == []
    assert len([s for s in val if s.label == 1]) == 1


def test_stratified_folds_hold_every_image_once_with_each_class_spread_evenly():
    from finetune.data.folders import Sample

    samples = [Sample(f"a{i}", 0) for i in range(11)] + [Sample(f"b{i}", 1) for i in range(4)]
    parts = stratified_folds(samples, 3, seed=1)
    assert sorted(s.path for p in parts for s in p) == sorted(s.path for s in samples)
    for label, n in ((0, 11), (1, 4)):
        sizes = [sum(s.label == label for s in p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    # the classes start where the last one stopped: the three parts differ in size by at most one
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == stratified_folds(list(reversed(samples)), 3, seed=1)  # deterministic, order-free
    assert parts != stratified_folds(samples, 3, seed=2)
    with pytest.raises(ValueError):
        stratified_folds(samples, 1, seed=1)


def test_folds_of_the_training_split_are_selection_splits_that_cover_train(tmp_path: Path):
    make_folder(tmp_path / "d", classes=("a", "b"), per_class=9)
    splits = scan_folder(tmp_path / "d", 0.2, 0)
    folds = splits.folds(3, 0)
    assert len(folds) == 3
    assert sorted(s.path for f in folds for s in f.val) == sorted(s.path for s in splits.train)
    for f in folds:
        assert not {s.path for s in f.train} & {s.path for s in f.val}
        assert len(f.train) + len(f.val) == len(splits.train) and f.test == []
    with pytest.raises(UserError, match="fewer folds"):
        splits.folds(len(splits.train) + 1, 0)
