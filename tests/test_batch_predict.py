"""serve.batch_predict: one row per file, errors as rows, resume without repeating work."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

import finetune.data.crops
from serve.batch_predict import list_inputs, main, predict_to_file, row_path
from tests import badfiles
from tests.conftest import make_folder, run_bounded
from tests.model_helpers import logged_model


@pytest.fixture
def folder_with_bad_files(tmp_path: Path) -> Path:
    root = make_folder(tmp_path / "images", per_class=3)
    nested = root / "dog" / "nested"
    nested.mkdir()
    (nested / "deep.png").write_bytes((root / "dog" / "dog_0.png").read_bytes())
    data = (root / "cat" / "cat_0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "cat" / "text.jpg").write_text("not an image")
    (root / "notes.txt").write_text("not listed: not an image extension")
    return root


@pytest.fixture
def decode_counter(monkeypatch) -> list[str]:
    """Paths decoded during the test (the model's logged input example is bytes, not counted)."""
    calls: list[str] = []
    real = finetune.data.crops.load_rgb
    monkeypatch.setattr(finetune.data.crops, "load_rgb", lambda src, *a, **k: (isinstance(src, str) and calls.append(src)) or real(src, *a, **k))
    return calls


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_one_row_per_file_with_errors_filled(tmp_path, folder_with_bad_files, suffix):
    uri = logged_model(tmp_path)
    out = tmp_path / f"preds{suffix}"
    result = CliRunner().invoke(main, ["--model-uri", uri, "--input", str(folder_with_bad_files), "--output",
                                       str(out), "--tta", "5crop", "--top-k", "2", "--batch-size", "4",
                                       "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(out)
    files = sorted(str(p) for p in folder_with_bad_files.rglob("*") if p.suffix in (".png", ".jpg"))
    assert sorted(frame["path"]) == files and len(frame) == 9
    assert list(frame.columns) == ["path", "label", "score", "top1_label", "top1_score", "top2_label",
                                   "top2_score", "ood_score", "unknown", "error"]
    bad = frame[frame["error"] != ""].set_index("path")
    assert set(bad.index) == {str(folder_with_bad_files / "cat" / n) for n in ("truncated.png", "text.jpg")}
    assert bad["error"].str.contains("image").all()
    good = frame[frame["error"] == ""]
    assert good["label"].isin(["cat", "dog"]).all()
    assert (good["label"] == good["top1_label"]).all()
    assert (good["top1_score"].astype(float) >= good["top2_score"].astype(float)).all()
    assert (good["top1_score"].astype(float) + good["top2_score"].astype(float)).round(4).eq(1.0).all()
    assert not list(tmp_path.glob(".preds*"))  # temp and partial files are gone after the rename


def read_output(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False) if path.suffix == ".csv" else pd.read_parquet(path)


@pytest.mark.parametrize("suffix, limit_from", [(".csv", "option"), (".parquet", "model")])
def test_every_bad_input_gets_one_row_that_says_why(tmp_path, suffix, limit_from):
    """The bad-input matrix of tests/badfiles.py through the CLI: usable files are predicted, unusable
    ones get one row whose error says why, junk and symlink loops give no rows, nothing is dropped.
    The pixel limit comes from --max-image-pixels or from the model (training's --max-image-pixels)."""
    uri = logged_model(tmp_path, max_image_pixels=10_000 if limit_from == "model" else None)
    images = tmp_path / "images"
    written = badfiles.write_all(images)
    # Differs from the other non-UTF-8 name only in an undecodable byte: it must keep a row of its own.
    twin = Path(os.fsdecode(os.path.join(os.fsencode(images), b"caf\xe9-\xfe.png")))
    Image.new("RGB", (40, 40), badfiles.RED).save(twin)
    big = images / "big.png"  # a fine image, but over the limit of 10000 pixels (the others are smaller): refused, no label
    Image.new("RGB", (120, 120), badfiles.RED).save(big)
    junk = badfiles.hidden_and_macosx(images)
    badfiles.symlink_loop(images)
    out = tmp_path / f"preds{suffix}"
    args = ["--model-uri", uri, "--input", str(images), "--output", str(out), "--batch-size", "4",
            "--num-workers", "0", *(["--max-image-pixels", "10000"] if limit_from == "option" else [])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    frame = read_output(out)
    listed = [*written.values(), twin, big]
    # One row per image file, each once (the loop was not followed), none for the junk.
    assert sorted(frame["path"]) == sorted(row_path(str(p)) for p in listed)
    assert not set(frame["path"]) & {str(p) for p in junk}
    rows = frame.set_index("path")
    for case in badfiles.USABLE:
        row = rows.loc[row_path(str(written[case.name]))]
        assert row["error"] == "" and row["label"] in ("cat", "dog") and float(row["score"]) > 0, case.name
    for case in badfiles.UNUSABLE + [badfiles.BadFile("big", None, False, "more than the limit of 10000")]:
        row = rows.loc[row_path(str(written.get(case.name, big)))]
        assert case.reason in row["error"] and row["label"] == "", (case.name, row["error"])
    assert "120x120 = 14400 pixels, more than the limit of 10000" in rows.loc[str(big), "error"]
    # Undecodable bytes of a name are written as \xNN: valid UTF-8, and the two names stay apart.
    assert {p.rsplit("/", 1)[1] for p in rows.index if p.startswith(str(images / "caf"))} == \
        {r"caf\xe9-\xff.png", r"caf\xe9-\xfe.png"}
    if suffix == ".csv":
        out.read_bytes().decode("utf-8")

    # The rows read back match their files: --resume keeps every one and predicts nothing again.
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert f"0 predicted, {len(listed)} kept from before, {len(listed)} rows" in again.output
    pd.testing.assert_frame_equal(read_output(out), frame)


def test_resume_predicts_only_new_images(tmp_path, decode_counter):
    uri = logged_model(tmp_path)
    images = make_folder(tmp_path / "images", per_class=3)
    out = tmp_path / "preds.csv"
    first = predict_to_file(uri, images, out, num_workers=0, progress=False)
    assert first["predicted"] == 6 and len(decode_counter) == 6
    before = pd.read_csv(out, keep_default_na=False)

    (images / "cat" / "new.png").write_bytes((images / "cat" / "cat_1.png").read_bytes())
    decode_counter.clear()
    second = predict_to_file(uri, images, out, num_workers=0, resume=True, progress=False)
    assert second == {**second, "total": 7, "already_done": 6, "predicted": 1}
    assert decode_counter == [str(images / "cat" / "new.png")]
    after = pd.read_csv(out, keep_default_na=False)
    assert sorted(after["path"]) == sorted(str(p) for p in images.rglob("*.png"))
    pd.testing.assert_frame_equal(after.iloc[:6], before)  # earlier rows kept as they were

    decode_counter.clear()
    third = predict_to_file(uri, images, out, num_workers=0, progress=False)  # no --resume: start over
    assert third["predicted"] == 7 and len(decode_counter) == 7


def test_resume_picks_up_the_partial_file_of_an_interrupted_run(tmp_path, decode_counter):
    uri = logged_model(tmp_path)
    images = make_folder(tmp_path / "images", per_class=3)
    out = tmp_path / "preds.csv"
    predict_to_file(uri, images, out, top_k=1, num_workers=0, progress=False)
    rows = list(csv.reader(out.read_text().splitlines()))
    out.unlink()
    # What a crash leaves: the partial file with two complete rows and a third cut mid-line.
    partial = tmp_path / ".preds.csv.partial.rank0.csv"
    lines = [",".join(r) for r in rows[:3]]
    partial.write_text("\n".join(lines) + "\n" + ",".join(rows[3])[:10])
    decode_counter.clear()
    result = predict_to_file(uri, images, out, top_k=1, num_workers=0, resume=True, progress=False)
    assert result["already_done"] == 2 and result["predicted"] == 4 and len(decode_counter) == 4
    frame = pd.read_csv(out, keep_default_na=False)
    assert sorted(frame["path"]) == sorted(r[0] for r in rows[1:]) and not partial.exists()

    # Everything done, a stale partial file around: nothing is predicted and no row is doubled.
    partial.write_text("\n".join(lines) + "\n")
    decode_counter.clear()
    again = predict_to_file(uri, images, out, top_k=1, num_workers=0, resume=True, progress=False)
    assert again["predicted"] == 0 and decode_counter == []
    assert len(pd.read_csv(out)) == 6 and not partial.exists()


def test_list_inputs_from_csv_and_text(tmp_path):
    (tmp_path / "list.csv").write_text("path,comment\na.png,x\nb.jpg,y\n")
    (tmp_path / "list.txt").write_text("# my images\na.png\n\n  b.jpg \n")
    assert list_inputs(tmp_path / "list.csv") == ["a.png", "b.jpg"]
    assert list_inputs(tmp_path / "list.txt") == ["a.png", "b.jpg"]
    (tmp_path / "bad.csv").write_text("file\na.png\n")
    result = CliRunner().invoke(main, ["--model-uri", "runs:/x/model", "--input", str(tmp_path / "bad.csv"),
                                       "--output", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "no 'path' column" in result.output


@pytest.mark.parametrize("kind", ["txt", "csv"])
def test_list_file_rows_and_bad_output_extension(tmp_path, kind):
    uri = logged_model(tmp_path)
    images = make_folder(tmp_path / "images", per_class=2)
    odd = badfiles.non_utf8_name(images)
    listed = [images / "cat" / "cat_0.png", odd, tmp_path / "missing.png", images / "dog"]
    listing = tmp_path / f"list.{kind}"
    listing.write_bytes((b"path\n" if kind == "csv" else b"") + b"".join(os.fsencode(p) + b"\n" for p in listed))
    out = tmp_path / "p.csv"
    assert predict_to_file(uri, str(listing), out, num_workers=0, progress=False)["predicted"] == 4
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame["path"]) == [row_path(str(p)) for p in listed]
    assert list(frame["error"]) == ["", "", "cannot read file (No such file or directory)",
                                    "cannot read file (Is a directory)"]
    assert list(frame["label"] != "") == [True, True, False, False]
    result = CliRunner().invoke(main, ["--model-uri", uri, "--input", str(listing), "--output",
                                       str(tmp_path / "p.json")])
    assert result.exit_code == 2 and ".csv, .parquet" in result.output


@pytest.mark.ddp
def test_ddp_shards_rows_without_duplicates(tmp_path, isolated_mlflow):
    """Two CPU ranks (gloo) in a process of their own, with a time limit for both; ~40 s on 2 busy cores,
    nearly all of it each rank importing torch, Lightning and MLflow."""
    uri = logged_model(tmp_path)
    images = make_folder(tmp_path / "images", per_class=5)
    out = tmp_path / "preds.csv"
    proc = run_bounded([sys.executable, "-m", "serve.batch_predict", "--model-uri", uri, "--input", str(images),
                        "--output", str(out), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                        "--batch-size", "2", "--num-workers", "0"],
                       timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = pd.read_csv(out, keep_default_na=False)
    inputs = sorted(str(p) for p in images.rglob("*.png"))
    # Every image once; rank 0's rows (every other input) then rank 1's: both ranks predicted.
    assert list(frame["path"]) == inputs[0::2] + inputs[1::2]


def test_help_and_unknown_model(tmp_path):
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "--resume" in result.output and "--tta" in result.output
    images = make_folder(tmp_path / "images", per_class=2)
    result = CliRunner().invoke(main, ["--model-uri", "models:/absent@champion", "--input", str(images),
                                       "--output", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "Cannot load model" in result.output
