"""Multi-label images: a label file's `labels` column, and splits that keep every label in train."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from finetune.data.folders import MULTI, scan_folder
from finetune.errors import UserError
from finetune.data.multilabel import iterative_parts, keep_every_label_in_first
from tests.conftest import make_multilabel_folder
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
