"""serve.batch_predict: one row per file, errors as rows, resume without repeating work."""

from __future__ import annotations

import csv
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

import finetune.data.crops
import serve.batch_predict as batch_predict
import serve.rows as rows_module
from finetune.errors import UserError
from serve.batch_predict import list_inputs, main, predict_to_file
from serve.rows import RowWriter, row_path
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


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial*.csv"))


def complete_rows(path: Path) -> dict[str, list[str]]:
    """The rows of a partial file by path, without its header or a last line cut short."""
    text = path.read_text()
    rows = list(csv.reader(text[:text.rfind("\n") + 1].splitlines()))
    return {r[0]: r for r in rows[1:]}


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C in the middle of a run."""


def interrupt_after(monkeypatch, batches: int) -> None:
    """The next runs stop with `Interrupted` when they come to batch number `batches` + 1."""
    real, calls = finetune.evaluation.tta.score_views, []

    def scoring(*args, **kwargs):
        if len(calls) == batches:
            raise Interrupted
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_predict, "score_views", scoring)


def test_two_interrupted_runs_in_a_row_keep_every_finished_row(tmp_path, monkeypatch, decode_counter):
    """In process (the killed-subprocess variant below is slow): a run stops after 3 batches, a --resume run
    after 2 more; the first run's file stays as it was, and a third --resume run predicts only the rest."""
    uri = logged_model(tmp_path)
    images = make_folder(tmp_path / "images", per_class=8, size=32)
    out = tmp_path / "preds.csv"
    args = dict(top_k=1, batch_size=2, num_workers=0, progress=False)
    interrupt_after(monkeypatch, 3)
    with pytest.raises(Interrupted):
        predict_to_file(uri, images, out, **args)
    [first] = partials(out)
    first_bytes, first_rows = first.read_bytes(), complete_rows(first)
    assert len(first_rows) == 6

    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        predict_to_file(uri, images, out, resume=True, **args)
    assert first.read_bytes() == first_bytes  # the resumed run neither emptied nor rewrote it
    [second] = [p for p in partials(out) if p != first]
    second_rows = complete_rows(second)
    assert len(second_rows) == 4 and not set(second_rows) & set(first_rows)

    monkeypatch.setattr(batch_predict, "score_views", finetune.evaluation.tta.score_views)
    decode_counter.clear()
    result = predict_to_file(uri, images, out, resume=True, **args)
    assert result == {**result, "total": 16, "already_done": 10, "predicted": 6}
    assert len(decode_counter) == 6 and not set(map(row_path, decode_counter)) & {*first_rows, *second_rows}
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(frame["path"]) == sorted(str(p) for p in images.rglob("*.png"))  # each image once
    by_path = frame.set_index("path")
    for path, row in {**first_rows, **second_rows}.items():
        assert list(by_path.loc[path]) == row[1:]  # earlier runs' rows, as they were written
    assert partials(out) == []


def run_until_rows(cmd: list[str], out: Path, rows: int, log_file: Path, timeout: float = 120) -> None:
    """Start `cmd` and SIGKILL it (its whole process group) once the partial files hold `rows` complete rows."""
    with open(log_file, "w") as log_:
        proc = subprocess.Popen(cmd, stdout=log_, stderr=log_, start_new_session=True,
                                cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + timeout
    try:
        while sum(len(complete_rows(p)) for p in partials(out)) < rows:
            assert proc.poll() is None, f"finished before it could be killed:\n{log_file.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {rows} rows within {timeout}s:\n{log_file.read_text()[-3000:]}"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_two_killed_runs_in_a_row_lose_no_finished_row(tmp_path):
    """The real thing: `python -m serve.batch_predict` SIGKILLed mid-way (batches of one image, so there is
    time to), then a `--resume` run SIGKILLed too, then a `--resume` run that finishes (in big batches: rows
    do not depend on the batch size). ~30 s on 2 busy cores, mostly three interpreters starting."""
    uri = logged_model(tmp_path)
    images = make_folder(tmp_path / "images", per_class=100, size=32)
    out = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "serve.batch_predict", "--model-uri", uri, "--input", str(images), "--output",
           str(out), "--num-workers", "0", "--top-k", "1"]
    run_until_rows([*cmd, "--batch-size", "1"], out, 10, tmp_path / "first.log")
    [first] = partials(out)
    first_bytes, first_rows = first.read_bytes(), complete_rows(first)
    assert 10 <= len(first_rows) < 200

    run_until_rows([*cmd, "--batch-size", "1", "--resume"], out, len(first_rows) + 10, tmp_path / "second.log")
    assert first.read_bytes() == first_bytes  # still on disk, as the first run left it
    [second] = [p for p in partials(out) if p != first]
    second_rows = complete_rows(second)
    assert len(second_rows) >= 10 and not set(second_rows) & set(first_rows)

    last = run_bounded([*cmd, "--batch-size", "64", "--resume"], timeout=240,
                       cwd=Path(__file__).resolve().parents[1])
    assert last.returncode == 0, last.stderr[-3000:]
    kept = len(first_rows) + len(second_rows)
    assert f"{200 - kept} predicted, {kept} kept from before, 200 rows" in last.stdout
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(frame["path"]) == sorted(str(p) for p in images.rglob("*.png"))  # each image once
    by_path = frame.set_index("path")
    for path, row in {**first_rows, **second_rows}.items():
        assert list(by_path.loc[path]) == row[1:]
    assert partials(out) == []


def test_a_live_runs_partial_file_is_neither_read_nor_deleted(tmp_path, decode_counter):
    """A finished earlier run's partial file is consumed by --resume; one that a live process holds locked
    (as a running prediction does) is not counted as done, and outlives this run's finalize."""
    uri = logged_model(tmp_path)
    images = make_folder(tmp_path / "images", per_class=3)
    out = tmp_path / "preds.csv"
    predict_to_file(uri, images, out, top_k=1, num_workers=0, progress=False)
    lines = out.read_text().splitlines()
    out.unlink()
    dead = tmp_path / ".preds.csv.partial.20000101T000000000000-aaaaaa.rank0.csv"
    dead.write_text("\n".join([lines[0], lines[1], lines[2]]) + "\n")
    live = tmp_path / ".preds.csv.partial.20000101T000000000000-bbbbbb.rank0.csv"
    live.write_text("\n".join([lines[0], lines[3], lines[4]]) + "\n")
    with open(live) as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        decode_counter.clear()
        result = predict_to_file(uri, images, out, top_k=1, num_workers=0, resume=True, progress=False)
        assert result["already_done"] == 2 and result["predicted"] == 4  # the dead file's rows only
        assert sorted(map(row_path, decode_counter)) == sorted(line.split(",")[0] for line in lines[3:])
        assert not dead.exists() and partials(out) == [live]
        assert live.read_text() == "\n".join([lines[0], lines[3], lines[4]]) + "\n"
        predict_to_file(uri, images, out, top_k=1, num_workers=0, progress=False)  # finalize without --resume
        assert partials(out) == [live]
    assert len(pd.read_csv(out)) == 6


def test_a_run_without_resume_leaves_earlier_partial_files(tmp_path, monkeypatch, caplog):
    """An interrupted run's file survives a later run without --resume (which says --resume would keep it).
    A --resume after that run keeps that run's newer rows, not the older file's, and then drops the file."""
    images = make_folder(tmp_path / "images", per_class=4, size=32)
    out = tmp_path / "preds.csv"
    args = dict(top_k=1, batch_size=2, num_workers=0, progress=False)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        predict_to_file(logged_model(tmp_path, seed=1), images, out, **args)
    [earlier] = partials(out)
    earlier_bytes = earlier.read_bytes()
    assert len(complete_rows(earlier)) == 4

    monkeypatch.setattr(batch_predict, "score_views", finetune.evaluation.tta.score_views)
    newer_model = logged_model(tmp_path, seed=2)
    with caplog.at_level(logging.WARNING, logger="serve.batch_predict"):
        assert predict_to_file(newer_model, images, out, **args)["predicted"] == 8
    assert partials(out) == [earlier] and earlier.read_bytes() == earlier_bytes
    assert "--resume would keep their rows" in caplog.text
    newer = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(newer["path"]) == sorted(str(p) for p in images.rglob("*.png"))
    older = complete_rows(earlier)
    assert any(newer.set_index("path").loc[p, "score"] != r[2] for p, r in older.items())  # two models

    time.sleep(0.01)  # mtimes apart even on a coarse clock
    assert predict_to_file(newer_model, images, out, resume=True, **args)["predicted"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(out, dtype=str, keep_default_na=False), newer)
    assert partials(out) == []


def test_a_forked_child_does_not_keep_a_partial_file_locked(tmp_path):
    """DataLoader workers fork while the partial file is open: a worker outliving its killed parent must not
    keep the lock, or the dead run's rows would look live to the next --resume."""
    rows = RowWriter(tmp_path / "preds.csv", [], ["cat", "dog"], 1)
    rows.open()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # fork's hooks have run by now, as in a DataLoader worker
        os.write(ready_w, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        with rows_module.claimed(rows.path) as ours:
            assert not ours  # the parent holds it
        rows.close()
        with rows_module.claimed(rows.path) as ours:
            assert ours  # the child, still alive, does not
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)


class FakeStrategy:
    """Rank 1 of two as Lightning's DDP strategy shows it to a callback: rank 0 sent `sent`."""

    def __init__(self, sent):
        self.sent = sent

    def broadcast(self, obj, src=0):
        return self.sent

    def reduce_boolean_decision(self, decision, all=True):
        return decision


def test_sharded_ranks_write_under_rank_zeros_token_and_refuse_to_disagree(tmp_path):
    """Each rank of `--strategy ddp` drew its own token; the files are named by rank 0's. A rank that
    found other images left to predict than rank 0 did stops instead of writing rows for the wrong images."""
    from types import SimpleNamespace

    out, todo = tmp_path / "preds.csv", ["a.png", "b.png"]
    writer = batch_predict.CsvRowWriter(RowWriter(out, todo, ["cat", "dog"], 1))
    trainer = SimpleNamespace(global_rank=1, strategy=FakeStrategy(("rank0token", rows_module.digest(todo))))
    writer.setup(trainer, None)
    writer.teardown(trainer, None)
    assert partials(out) == [rows_module.partial_path(out, "rank0token", 1)]

    other = batch_predict.CsvRowWriter(RowWriter(out, todo[:1], ["cat", "dog"], 1))
    with pytest.raises(UserError, match="different images left to predict"):
        other.setup(trainer, None)
    assert len(partials(out)) == 1


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
    assert partials(out) == []  # rank 0 merged and removed both ranks' files, named by its token


def test_help_and_unknown_model(tmp_path):
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "--resume" in result.output and "--tta" in result.output
    images = make_folder(tmp_path / "images", per_class=2)
    result = CliRunner().invoke(main, ["--model-uri", "models:/absent@champion", "--input", str(images),
                                       "--output", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "Cannot load model" in result.output
