"""Which folder layout a data folder has: split folders and their synonyms, train + test with val split
off train, class folders that happen to have a split name, and the mixes that are errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.data.folders import scan_folder, stratified_split
from finetune.errors import UserError
from tests.conftest import make_folder, tiny_train_args

LAYOUT_NAMES = ("DATA/<class>/", "DATA/train/ + DATA/val/", "DATA/train/ + DATA/test/", "training", "validation",
                "testing")


def _names(samples) -> list[str]:
    return sorted(Path(s.path).name for s in samples)


@pytest.mark.parametrize("train_name, test_name", [("train", "test"), ("training", "testing"), ("TRAIN", "Test")])
def test_train_and_test_folders_split_val_off_train_and_keep_test(tmp_path: Path, train_name: str, test_name: str):
    root = tmp_path / "d"
    make_folder(root / train_name, per_class=10)
    make_folder(root / test_name, per_class=3, seed=1)
    splits = scan_folder(root, val_fraction=0.3, seed=4)
    assert splits.layout == "train-test-folders"
    assert splits.classes == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (14, 6, 6)
    # val is the very split class folders get: stratified, seeded, carved from train only
    whole = scan_folder(root / train_name, val_fraction=0.3, seed=4)
    assert whole.layout == "class-folders"
    assert _names(splits.val) == _names(whole.val) and _names(splits.train) == _names(whole.train)
    _, expected_val = stratified_split(whole.train + whole.val, 0.3, 4)
    assert _names(splits.val) == _names(expected_val)
    assert all(Path(s.path).parts[-3] == train_name for s in splits.train + splits.val)
    assert all(Path(s.path).parts[-3] == test_name for s in splits.test)
    assert sorted(s.label for s in splits.val) == [0, 0, 0, 1, 1, 1]
    assert scan_folder(root, val_fraction=0.3, seed=5).val != splits.val
    assert splits.evaluation_parts() == {"test": splits.test}


@pytest.mark.parametrize("train_name", ["train", "training", "Training"])
@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "VAL", "Validation"])
@pytest.mark.parametrize("test_name", [None, "test", "testing", "TEST"])
def test_every_synonym_of_the_user_split(tmp_path: Path, train_name: str, val_name: str, test_name: str | None):
    root = tmp_path / "d"
    make_folder(root / train_name, per_class=4)
    make_folder(root / val_name, per_class=2)
    if test_name:
        make_folder(root / test_name, per_class=3)
    splits = scan_folder(root)
    assert splits.layout == "split-folders"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 6 if test_name else 0)
    assert all(Path(s.path).parts[-3] == val_name for s in splits.val)
    assert set(splits.evaluation_parts()) == {"val", "test"}


def test_class_folders_and_a_lone_train_folder_are_unchanged(tmp_path: Path):
    make_folder(tmp_path / "a", classes=("cat", "dog", "fox"), per_class=5)
    splits = scan_folder(tmp_path / "a")
    assert splits.layout == "class-folders" and splits.classes == ["cat", "dog", "fox"] and not splits.test
    assert set(splits.evaluation_parts()) == {"all"}
    make_folder(tmp_path / "b" / "training", per_class=5)
    splits = scan_folder(tmp_path / "b")
    assert splits.layout == "class-folders" and splits.classes == ["cat", "dog"]


@pytest.mark.parametrize("split_name", ["train", "test", "Validation"])
def test_a_class_may_have_a_split_name(tmp_path: Path, split_name: str):
    """One split-named folder among class folders, holding images (even in nested folders), is a class."""
    root = make_folder(tmp_path / "d", classes=("bus", "car", split_name), per_class=4)
    make_folder(root / "bus", classes=("2007",), per_class=2)  # nested folders below a class are fine
    make_folder(root / split_name, classes=("2007",), per_class=2)
    splits = scan_folder(root)
    assert splits.layout == "class-folders"
    assert splits.classes == sorted(["bus", "car", split_name])
    assert len(splits.train) + len(splits.val) == 16


def _split_folder_beside_classes(root: Path) -> None:
    make_folder(root)
    make_folder(root / "val", per_class=2)


def _only(*names: str):
    def setup(root: Path) -> None:
        for name in names:
            make_folder(root / name, per_class=3)
    return setup


@pytest.mark.parametrize(
    "setup, problem",
    [
        (_only("val"), "val/ but no train folder"),
        (_only("test"), "test/ but no train folder"),
        (_only("Valid", "testing"), "Valid/, testing/ but no train folder"),
        (_only("train", "val", "validation"), "val/ and validation/ both name the val split"),
        (_only("train", "training", "test"), "train/ and training/ both name the train split"),
        (_only("train", "test", "testing"), "test/ and testing/ both name the test split"),
        (_only("train", "test", "holdout"), "split folders test/, train/ sit next to other folders (holdout/)"),
        (_only("train", "val", "cat", "dog"), "split folders train/, val/ sit next to other folders (cat/, dog/)"),
        (_split_folder_beside_classes, "val/ holds cat/, dog/ like the class folders next to it"),
    ],
    ids=["val-only", "test-only", "val-test", "two-vals", "two-trains", "two-tests", "extra-folder",
         "splits-and-classes", "val-beside-classes"],
)
def test_ambiguous_layouts_are_errors_naming_the_accepted_ones(tmp_path: Path, setup, problem: str):
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(UserError) as err:
        scan_folder(root)
    message = str(err.value)
    assert message.startswith("Cannot tell the layout of ")
    assert problem in message
    for name in LAYOUT_NAMES:
        assert name in message


def test_empty_test_folder_of_train_test_layout_is_an_error(tmp_path: Path):
    root = tmp_path / "d"
    make_folder(root / "train", per_class=4)
    (root / "test" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="test split .* holds no usable image: add images to it or remove it"):
        scan_folder(root)


def test_cli_ambiguous_layout_exits_with_message_and_no_traceback(tmp_path: Path):
    root = tmp_path / "d"
    make_folder(root / "train", per_class=3)
    make_folder(root / "val", per_class=2)
    make_folder(root / "validation", per_class=2)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, tiny_train_args(root, out))
    assert result.exit_code == 2, result.output
    assert "val/ and validation/ both name the val split" in result.output
    assert "Accepted layouts: DATA/<class>/" in result.output
    assert "Traceback" not in result.output
    assert not (out / "summary.json").exists()


def test_cli_trains_on_train_and_test_folders_and_logs_the_layout(tmp_path: Path):
    root = tmp_path / "d"
    make_folder(root / "train", per_class=5)
    make_folder(root / "test", per_class=2, seed=1)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, tiny_train_args(root, out, "--val-fraction", "0.4"))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "summary.json").read_text())["data"]
    assert data["layout"] == "train-test-folders"
    assert (data["train"], data["val"], data["test"]) == (6, 4, 4)
