"""Edge cases found in review: file modes, config values, pixel limits by path, resume from another folder,
partial files whose names hold line breaks, an early refusal of a used --output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.config import resolve_config
from finetune.errors import UserError
from finetune.files import atomic_write
from tests.conftest import tiny_train_args
from tests.model_helpers import logged_model


def test_atomic_files_get_the_mode_a_plain_open_would_give(tmp_path: Path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "model.json") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "model.json").stat().st_mode & 0o777 == 0o644  # readable by a server running as another user


@pytest.mark.parametrize("values, message", [
    ({"epochs": float("inf")}, "epochs=inf is not a valid int"),
    ({"lr": float("nan")}, "lr=nan is not a valid float (a finite number)"),
    ({"val_fraction": float("nan")}, "val_fraction=nan is not a valid float"),
])
def test_infinite_and_nan_values_are_refused(values, message):
    with pytest.raises(UserError) as e:
        resolve_config(values, {"data_dir": "d"})
    assert message in e.value.message


def test_one_config_file_serves_every_command():
    train_file = {"tta": "10crop", "register": "x", "experiment": "e", "epochs": 3}
    assert resolve_config(train_file, {"data_dir": "d"}, "audit").epochs == 10  # epochs does not act on audit
    assert resolve_config(train_file, {"data_dir": "d"}, "plan").epochs == 3


def test_batch_prediction_keeps_the_training_pixel_limit_and_rest_requests_are_capped(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch):
    from finetune.data.images import DEFAULT_MAX_PIXELS
    from finetune.tracking.pyfunc import SERVING_MAX_PIXELS, load_logged_model

    model = load_logged_model(logged_model(tmp_path))
    assert model.max_pixels == DEFAULT_MAX_PIXELS  # what training read, batch prediction and evaluation read
    assert model.request_max_pixels == SERVING_MAX_PIXELS
    monkeypatch.setenv("FINETUNE_MAX_IMAGE_PIXELS", str(60_000_000))  # a server that chose its own
    assert load_logged_model(logged_model(tmp_path, seed=1)).request_max_pixels == 60_000_000


def test_a_partial_row_whose_path_holds_a_line_break_reads_back_whole(tmp_path: Path):
    from serve import rows as batch_rows

    path = tmp_path / ".out.csv.partial.x.rank0.csv"
    rows = [["path", "label"], ["a\u2028b.png", "cat"], ["c\nd.png", "dog"]]
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    assert batch_rows._read_partial(str(path)) == rows


def test_a_used_output_is_refused_before_the_measurement(image_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = CliRunner().invoke(cli, tiny_train_args(image_folder, out))
    assert r.exit_code == 2 and "is not empty" in r.output
    assert "Scenario" not in r.output and not (tmp_path / ".cache").exists()  # nothing measured or extracted


def test_resume_from_another_working_folder_with_the_data_given_absolute(image_folder: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(image_folder.parent)
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, tiny_train_args(Path(image_folder.name), out, "--epochs", "1")).exit_code == 0
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "c.yaml").write_text("lr: 0.5\n")
    r = CliRunner().invoke(cli, ["train", str(image_folder.resolve()), "--resume", run_id, "--config", "c.yaml"])
    assert r.exit_code == 2 and "Cannot change lr" in r.output  # a file's value counts, as a flag's does
    r = CliRunner().invoke(cli, ["train", str(image_folder.resolve()), "--resume", run_id, "--epochs", "2"])
    assert r.exit_code == 0, r.output
