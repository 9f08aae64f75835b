"""Labels from a CSV file instead of class folders: `finetune train LABELS.csv`.

Columns: `path` and `label`, and optionally `split` (train, val or test; empty: train). Paths are relative to
the CSV file's folder (or absolute). The images stay where they are: nothing is moved or copied.

Every bad row is reported like an unreadable image (counted and listed, never dropped silently): a file that
does not exist, an empty label, an unknown split, a path listed twice with different labels (every row of it),
and a row that repeats an earlier one (the image is kept once). A `labels` column (several labels per image)
is refused with a clear message: this version trains one label per image.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.images import display_path
from finetune.data.split_names import SPLIT_OF_NAME
from finetune.errors import UserError

SPLITS = {"": "train", **SPLIT_OF_NAME}  # an empty split: train


@dataclass
class LabelFile:
    """What a label file lists: split -> class -> image paths (in row order), and the rows it could not use as
    (path or row, why)."""

    parts: dict[str, dict[str, list[str]]]
    bad: list[tuple[str, str]] = field(default_factory=list)


def is_label_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".csv" and Path(path).is_file()


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return [c.strip().lower() for c in reader.fieldnames or []], rows
    except OSError as e:
        raise UserError(f"Cannot read the label file {display_path(path)}: {e.strerror or e}.") from None
    except csv.Error as e:
        raise UserError(f"{display_path(path)} is not a readable CSV file: {e}.") from None


def read_label_file(path: str | Path) -> LabelFile:
    """The images and labels a CSV file lists, by split and class; UserError when it cannot be used at all."""
    path = Path(path)
    columns, rows = _rows(path)
    if "labels" in columns and "label" not in columns:
        raise UserError(f"{display_path(path)} has a 'labels' column (several labels per image): this version "
                        "trains one label per image. Use a 'label' column, one label per row.")
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise UserError(f"{display_path(path)} needs the columns path and label (and optionally split); it has "
                        f"{', '.join(columns) or 'none'}.")
    folder, seen, conflicted = path.parent, {}, set()
    result = LabelFile(defaultdict(lambda: defaultdict(list)))
    for number, raw in enumerate(rows, start=2):  # row 1 is the header
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"row {number}"
        if not row["path"]:
            result.bad.append((where, "no path"))
            continue
        image = str(folder / row["path"]) if not os.path.isabs(row["path"]) else row["path"]
        split = SPLITS.get(row.get("split", "").lower())
        why = ("empty label" if not row["label"] else
               f"unknown split {row.get('split')!r} (train, val or test)" if split is None else
               "file not found" if not os.path.isfile(image) else None)
        if why:
            result.bad.append((display_path(image), f"{where}: {why}"))
            continue
        key = os.path.realpath(image)
        if key in seen:
            first, label, first_split = seen[key]
            if key in conflicted or (label, first_split) != (row["label"], split):
                conflicted.add(key)
                result.bad.append((display_path(image), f"{where}: listed in row {first} as {label!r} ({first_split})"
                                   f" and here as {row['label']!r} ({split}): both rows left out"))
                _drop(result.parts, image)
            else:
                result.bad.append((display_path(image), f"{where}: repeats row {first} (kept once)"))
            continue
        seen[key] = (number, row["label"], split)
        result.parts[split][row["label"]].append(image)
    result.parts = {s: {c: sorted(files) for c, files in per_class.items() if files}
                    for s, per_class in result.parts.items()}
    if not result.parts.get("train"):
        raise UserError(f"{display_path(path)} lists no usable training image ({len(rows)} row(s), "
                        f"{len(result.bad)} bad).")
    return result


def _drop(parts: dict[str, dict[str, list[str]]], image: str) -> None:
    for per_class in parts.values():
        for files in per_class.values():
            if image in files:
                files.remove(image)
