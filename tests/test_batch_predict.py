"""serve.batch_predict: one row per file, errors as rows, resume without repeating work."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import finetune.tta
from serve.batch_predict import list_inputs, main, predict_to_file
from tests.conftest import make_folder
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
    real = finetune.tta.load_rgb
    monkeypatch.setattr(finetune.tta, "load_rgb", lambda src, *a, **k: (isinstance(src, str) and calls.append(src)) or real(src, *a, **k))
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
                                   "top2_score", "error"]
    bad = frame[frame["error"] != ""].set_index("path")
    assert set(bad.index) == {str(folder_with_bad_files / "cat" / n) for n in ("truncated.png", "text.jpg")}
    assert bad["error"].str.contains("image").all()
    good = frame[frame["error"] == ""]
    assert good["label"].isin(["cat", "dog"]).all()
    assert (good["label"] == good["top1_label"]).all()
    assert (good["top1_score"].astype(float) >= good["top2_score"].astype(float)).all()
    assert (good["top1_score"].astype(float) + good["top2_score"].astype(float)).round(4).eq(1.0).all()
    assert not list(tmp_path.glob(".preds*"))  # temp and partial files are gone after the rename


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


def test_list_file_rows_and_bad_output_extension(tmp_path):
    uri = logged_model(tmp_path)
    images = make_folder(tmp_path / "images", per_class=2)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'cat' / 'cat_0.png'}\n{tmp_path / 'missing.png'}\n")
    out = tmp_path / "p.csv"
    assert predict_to_file(uri, str(listing), out, num_workers=0, progress=False)["predicted"] == 2
    frame = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert frame.loc[str(tmp_path / "missing.png"), "error"] != ""
    assert frame.loc[str(images / "cat" / "cat_0.png"), "error"] == ""
    result = CliRunner().invoke(main, ["--model-uri", uri, "--input", str(listing), "--output",
                                       str(tmp_path / "p.json")])
    assert result.exit_code == 2 and ".csv, .parquet" in result.output


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_shards_rows_without_duplicates(tmp_path, isolated_mlflow):
    uri = logged_model(tmp_path)
    images = make_folder(tmp_path / "images", per_class=5)
    out = tmp_path / "preds.csv"
    proc = subprocess.run([sys.executable, "-m", "serve.batch_predict", "--model-uri", uri, "--input", str(images),
                           "--output", str(out), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                           "--batch-size", "2", "--num-workers", "0"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = pd.read_csv(out, keep_default_na=False)
    assert sorted(frame["path"]) == sorted(str(p) for p in images.rglob("*.png"))


def test_help_and_unknown_model(tmp_path):
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "--resume" in result.output and "--tta" in result.output
    images = make_folder(tmp_path / "images", per_class=2)
    result = CliRunner().invoke(main, ["--model-uri", "models:/absent@champion", "--input", str(images),
                                       "--output", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "Cannot load model" in result.output
