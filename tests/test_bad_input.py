"""The bad-input matrix: every awkward or broken file is either used correctly or skipped with a
reason, folders with junk are scanned safely, and training finishes with all of it in the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image, ImageFile

from finetune.cli import cli
from finetune.data.folders import iter_image_files, scan_folder
from finetune.errors import UserError
from finetune.data.images import ImageError, display_path, load_rgb
from tests import badfiles
from tests.conftest import make_folder, tiny_train_args


@pytest.mark.parametrize("case", badfiles.BAD_FILES, ids=lambda c: c.name)
def test_load_rgb_uses_or_refuses_each_bad_file(case: badfiles.BadFile, tmp_path: Path):
    path = case.make(tmp_path)
    if case.usable:
        img = load_rgb(path)
        assert img.mode == "RGB"
        assert case.check(img), f"{case.name}: decoded pixels are wrong"
    else:
        with pytest.raises(ImageError, match=case.reason.replace("(", r"\(").replace(")", r"\)")):
            load_rgb(path)


def test_pixel_limit_refuses_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100), badfiles.RED).save(big)
    assert load_rgb(big, max_pixels=10_000).size == (100, 100)  # at the limit: fine

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=r"100x100 = 10000 pixels, more than the limit of 9999 "
                                         r"\(raise --max-image-pixels"):
        load_rgb(big, max_pixels=9_999)
    with pytest.raises(ImageError, match="more than the limit of 89478485"):
        load_rgb(badfiles.pixel_bomb_png(tmp_path))


def test_scan_skips_exactly_the_unusable_files_and_reports_why(tmp_path: Path):
    data = make_folder(tmp_path / "data", per_class=6)
    written = badfiles.write_all(data / "cat")
    splits = scan_folder(data, 0.25, 0)
    skipped = {s.path: s.reason for s in splits.skipped}
    assert set(skipped) == {display_path(written[c.name]) for c in badfiles.UNUSABLE}
    for case in badfiles.UNUSABLE:
        assert case.reason in skipped[display_path(written[case.name])]
    used = {s.path for s in splits.train + splits.val}
    assert {str(written[c.name]) for c in badfiles.USABLE} <= used
    # nothing silently dropped: every image file is either used or reported
    assert len(used) + len(skipped) == 12 + len(badfiles.BAD_FILES)
    assert "skipped 4 unreadable file(s)" in splits.skipped_report()


def test_hidden_files_macosx_and_symlink_loops_are_ignored(tmp_path: Path):
    data = make_folder(tmp_path / "data", per_class=4)
    junk = badfiles.hidden_and_macosx(data / "cat")
    badfiles.hidden_and_macosx(data)  # a __MACOSX folder next to the class folders is no class
    badfiles.symlink_loop(data / "dog")
    files = iter_image_files(data / "dog")
    assert len(files) == 4  # each image once, the walk did not follow the loop forever
    assert len(iter_image_files(data / "cat")) == 4 and not set(map(str, junk)) & set(iter_image_files(data))
    splits = scan_folder(data, 0.25, 0)
    assert splits.classes == ["cat", "dog"] and not splits.skipped
    assert len(splits.train) + len(splits.val) == 8


def test_class_folder_empty_after_filtering_is_a_clear_error(tmp_path: Path):
    data = make_folder(tmp_path / "data", classes=("cat", "dog", "owl"), per_class=3)
    for f in (data / "owl").iterdir():
        f.unlink()
    badfiles.hidden_and_macosx(data / "owl")
    (data / "owl" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"Class folder .*owl has no usable image: it holds no image files"):
        scan_folder(data)


def test_class_whose_images_are_all_corrupt_is_a_clear_error(tmp_path: Path):
    data = make_folder(tmp_path / "data", per_class=3)
    for f in (data / "dog").iterdir():
        f.write_bytes(f.read_bytes()[:40])  # every dog image truncated
    with pytest.raises(UserError, match=r"Class folder .*dog has no usable image: all 3 image file\(s\) in "
                                        r"it are unreadable\. Add images or remove the folder\."):
        scan_folder(data)
    r = CliRunner().invoke(cli, tiny_train_args(data, tmp_path / "out"))
    assert r.exit_code == 2 and "all 3 image file(s) in it are unreadable" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()  # refused before any work


def test_training_finishes_with_the_whole_matrix_in_the_data(tmp_path: Path, isolated_mlflow: str):
    data = make_folder(tmp_path / "data", per_class=6)
    written = badfiles.write_all(data / "cat")
    badfiles.hidden_and_macosx(data / "dog")
    badfiles.symlink_loop(data / "dog")
    big = data / "dog" / "big.png"
    Image.new("RGB", (100, 100), (40, 40, 220)).save(big)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, tiny_train_args(data, out, "--max-image-pixels", "5000"))
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    expected_skips = {display_path(written[c.name]) for c in badfiles.UNUSABLE} | {str(big)}
    assert set(summary["skipped_files"]) == expected_skips
    counts = summary["data"]
    assert counts["train"] + counts["val"] == 12 + len(badfiles.USABLE)
    report = MlflowClient(isolated_mlflow).download_artifacts(summary["mlflow_run_id"], "skipped_files.json",
                                                               str(tmp_path))
    reasons = {f["path"]: f["reason"] for f in json.loads(Path(report).read_text())["files"]}
    assert "more than the limit of 5000" in reasons[str(big)]
    assert "empty file (0 bytes)" in reasons[display_path(written["zero-byte"])]
