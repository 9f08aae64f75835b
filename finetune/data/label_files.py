"""Labels from a CSV file instead of class folders: `finetune train LABELS.csv`.

Columns: `path` and `label` (one label per image), or `path` and `labels` (several labels per image, separated
by `;`: a multi-label file), and optionally `split` (train, val or test; empty: train). Paths are relative to the
CSV file's folder (or absolute). The images stay where they are: nothing is moved or copied.

Every bad row is reported like an unreadable image (counted and listed, never dropped silently): a file that
does not exist, an empty label, an unknown split, a path listed twice with different labels (every row of it),
and a row that repeats an earlier one (the image is kept once). In a `labels` column the order of the labels and
a label named twice do not matter: `b;a;a` is the set {a, b}.
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
    multi_label: bool = False  # a `labels` column: an image is listed under each of its labels in `parts`
    label_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # image path -> its labels (multi-label)


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
    if "label" in columns and "labels" in columns:
        raise UserError(f"{display_path(path)} has both a 'label' and a 'labels' column: keep 'label' for one label "
                        "per image, or 'labels' for several (separated by ;).")
    column = "labels" if "labels" in columns else "label"
    if "path" not in columns or column not in columns:
        raise UserError(f"{display_path(path)} needs the columns path and label (one label per image) or path and "
                        f"labels (several, separated by ;), and optionally split; it has {', '.join(columns) or 'none'}.")
    folder, seen, conflicted = path.parent, {}, set()
    result = LabelFile(defaultdict(lambda: defaultdict(list)), multi_label=column == "labels")
    for number, raw in enumerate(rows, start=2):  # row 1 is the header
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"row {number}"
        if not row["path"]:
            result.bad.append((where, "no path"))
            continue
        image = str(folder / row["path"]) if not os.path.isabs(row["path"]) else row["path"]
        split = SPLITS.get(row.get("split", "").lower())
        label = row[column] if column == "label" else tuple(sorted({v.strip() for v in row[column].split(";")} - {""}))
        why = (f"empty {column}" if not label else
               f"unknown split {row.get('split')!r} (train, val or test)" if split is None else
               "file not found" if not os.path.isfile(image) else None)
        if why:
            result.bad.append((display_path(image), f"{where}: {why}"))
            continue
        key = os.path.realpath(image)
        if key in seen:
            first, first_label, first_split = seen[key]
            if key in conflicted or (first_label, first_split) != (label, split):
                conflicted.add(key)
                result.bad.append((display_path(image), f"{where}: listed in row {first} as {_shown(first_label)} "
                                   f"({first_split}) and here as {_shown(label)} ({split}): both rows left out"))
                _drop(result.parts, image)
                result.label_sets.pop(image, None)
            else:
                result.bad.append((display_path(image), f"{where}: repeats row {first} (kept once)"))
            continue
        seen[key] = (number, label, split)
        for name in (label,) if column == "label" else label:
            result.parts[split][name].append(image)
        if column == "labels":
            result.label_sets[image] = label
    result.parts = {s: {c: sorted(files) for c, files in per_class.items() if files}
                    for s, per_class in result.parts.items()}
    if not result.parts.get("train"):
        raise UserError(f"{display_path(path)} lists no usable training image ({len(rows)} row(s), "
                        f"{len(result.bad)} bad).")
    return result


def _shown(label: str | tuple[str, ...]) -> str:
    return repr(label) if isinstance(label, str) else repr(";".join(label))


def _drop(parts: dict[str, dict[str, list[str]]], image: str) -> None:
    for per_class in parts.values():
        for files in per_class.values():
            if image in files:
                files.remove(image)
