"""The names of the user's own splits, any case: a split folder's name, or a label file's `split` value."""

from __future__ import annotations

TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation")
TEST_NAMES = ("test", "testing")
SPLIT_OF_NAME = {**{n: "train" for n in TRAIN_NAMES}, **{n: "val" for n in VAL_NAMES},
                 **{n: "test" for n in TEST_NAMES}}
