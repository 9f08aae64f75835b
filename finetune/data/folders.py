"""Image folders: scan, validate, split, and serve them as a Lightning DataModule.

Three layouts are accepted (``FolderSplits.layout`` names the one found):

* ``DATA/<class>/...`` -- "class-folders": split here, stratified and deterministic (``val_fraction``,
  ``seed``); ``DATA/train/<class>/...`` with nothing next to ``train/`` is read the same way;
* ``DATA/{train, val[, test]}/<class>/...`` -- "split-folders": the user's own split;
* ``DATA/{train, test}/<class>/...`` -- "train-test-folders": val is split off train exactly as for
  class folders (stratified, ``val_fraction``, ``seed``), test is kept as the user's test split.

Split folder names, any case: ``train|training``, ``val|valid|validation``, ``test|testing``. The rule:

1. no top-level folder has a split name: class folders;
2. every top-level folder has a split name: the user's splits -- train + val [+ test], train + test, or
   train alone; anything else (val or test without train, two names for one split such as ``val/``
   and ``validation/``) is an error;
3. split names mixed with other names: a single split-named folder is a class like any other (a class
   may be called "train" or "test"), unless it holds a folder named like one of its siblings
   (``DATA/val/cat/`` next to ``DATA/cat/``: a split folder beside class folders), which is an error;
   two or more split-named folders next to other folders are an error.

A CSV label file (`data/label_files.py`: columns path, label and optionally split) stands for the folder:
"csv" (val split off train as above), "csv-train-test", or "csv-splits" (the file names a validation split).

Every error names the accepted layouts. Images may sit in nested folders below a class folder. Every
file is decoded once while scanning (JPEGs at 1/8 scale, so it is cheap); files that cannot be used are
skipped and reported, so no epoch ever crashes on a bad file.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


from finetune.errors import UserError
from finetune.data.images import IMAGE_EXTENSIONS, ImageError, ImageInfo, display_path, probe_image
from finetune.data.label_files import LabelFile, is_label_file, read_label_file
from finetune.data.multilabel import iterative_parts, keep_every_label_in_first
from finetune.data.split_names import SPLIT_OF_NAME

log = logging.getLogger(__name__)

ACCEPTED_LAYOUTS = (
    "Accepted layouts: DATA/<class>/... (class folders; val is split off with --val-fraction); "
    "DATA/train/ + DATA/val/ [+ DATA/test/], each holding the same class folders; "
    "DATA/train/ + DATA/test/ (val is split off train with --val-fraction, test is kept). "
    "Split folder names, any case: train or training; val, valid or validation; test or testing.")
IGNORED_DIRS = {"__MACOSX", "__pycache__"}


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # the class index; MULTI for an image with several labels (multi-label data)
    info: ImageInfo | None = None
    labels: tuple[int, ...] = ()  # multi-label data: the indices of every class the image shows


MULTI = -1  # Sample.label of a multi-label image: its classes are in Sample.labels


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class FolderSplits:
    """The result of scanning an image folder."""

    root: str
    layout: str  # "class-folders", "split-folders", "train-test-folders"; "csv", "csv-train-test", "csv-splits"
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # left out by --exclude, as display paths
    multi_label: bool = False  # a label file with a `labels` column: each Sample's classes are in `labels`

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test),
                "skipped": len(self.skipped), "classes": len(self.classes)}

    def selection(self, fraction: float, seed: int) -> "FolderSplits":
        """The training split cut in two for choices made during training: `train` = what the network fits on,
        `val` = the selection split (stratified, `fraction` of each class, at least one image of each class
        with two or more). The user's val and test are not in it: they are only read to report."""
        fit, select = stratified_split(self.train, fraction, seed)
        if not select:
            raise UserError(f"Too few training images ({len(self.train)}) to hold out a selection split "
                            "(each class needs at least 2 images). Add images.")
        return FolderSplits(self.root, self.layout, self.classes, fit, select, multi_label=self.multi_label)

    def folds(self, k: int, seed: int) -> list["FolderSplits"]:
        """The training split cut k ways (stratified): k `selection`-like splits whose `val` parts are disjoint
        and together hold every training image once (`stratified_folds`)."""
        parts = stratified_folds(self.train, k, seed)
        if any(not p for p in parts):
            raise UserError(f"Too few training images ({len(self.train)}) for {k} selection folds. "
                            "Use fewer folds or add images.")
        return [FolderSplits(self.root, self.layout, self.classes,
                             [s for j, p in enumerate(parts) if j != i for s in p], part, multi_label=self.multi_label)
                for i, part in enumerate(parts)]

    def evaluation_parts(self) -> dict[str, list[Sample]]:
        """What `finetune evaluate` reports on: the user's val and test splits; only test when val was
        split off train here (its split need not be the one the model was trained with); every image
        of a plain class-folder tree."""
        if self.layout == "split-folders":
            return {"val": self.val, "test": self.test}
        if self.layout == "train-test-folders":
            return {"test": self.test}
        return {"all": self.train + self.val}

    def skipped_report(self, limit: int = 5) -> str:
        if not self.skipped:
            return "no unreadable files"
        first = "; ".join(f"{s.path} ({s.reason})" for s in self.skipped[:limit])
        more = f" and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"skipped {len(self.skipped)} unreadable file(s): {first}{more}"


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_DIRS


def _list_dirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"Cannot read folder {display_path(folder)}: {e.strerror}.") from None
    return [Path(e.path) for e in entries if not _is_hidden(e.name) and e.is_dir()]


def iter_image_files(folder: str | Path) -> list[str]:
    """All image files under a folder, recursively, sorted; hidden files, `__MACOSX` and symlink
    loops are skipped."""
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return found


def _layout_error(root: Path, problem: str) -> UserError:
    return UserError(f"Cannot tell the layout of {display_path(root)}: {problem}. {ACCEPTED_LAYOUTS} "
                     "Rename or move the folders to match one of them.")


def _names(dirs: Sequence[Path]) -> str:
    return ", ".join(f"{d.name}/" for d in dirs)


def _detect_layout(root: Path) -> tuple[str, dict[str, Path]]:
    """The layout of `root` and its parts ("all", or "train"/"val"/"test"); the rule is in the module doc."""
    dirs = _list_dirs(root)
    split_dirs = [d for d in dirs if d.name.lower() in SPLIT_OF_NAME]
    others = [d for d in dirs if d.name.lower() not in SPLIT_OF_NAME]
    if not split_dirs:
        return "class-folders", {"all": root}
    if others:
        if len(split_dirs) > 1:
            raise _layout_error(root, f"split folders {_names(split_dirs)} sit next to other folders "
                                      f"({_names(others)})")
        sibling_names = {d.name.lower() for d in others}
        inside = [d for d in _list_dirs(split_dirs[0]) if d.name.lower() in sibling_names]
        if inside:
            raise _layout_error(root, f"{split_dirs[0].name}/ holds {_names(inside)} like the class folders "
                                      "next to it: a split folder beside class folders")
        return "class-folders", {"all": root}  # a class that happens to have a split name
    parts: dict[str, Path] = {}
    for d in split_dirs:
        split = SPLIT_OF_NAME[d.name.lower()]
        if split in parts:
            raise _layout_error(root, f"{parts[split].name}/ and {d.name}/ both name the {split} split")
        parts[split] = d
    if "train" not in parts:
        raise _layout_error(root, f"{_names(split_dirs)} but no train folder")
    if "val" in parts:
        return "split-folders", parts
    if "test" in parts:
        return "train-test-folders", parts
    return "class-folders", {"all": parts["train"]}


def _class_files(split_root: Path) -> dict[str, list[str]]:
    class_dirs = _list_dirs(split_root)
    return {d.name: iter_image_files(d) for d in class_dirs}


def _probe_all(paths: Sequence[str], max_pixels: int) -> dict[str, ImageInfo | str]:
    def probe(p: str) -> ImageInfo | str:
        try:
            return probe_image(p, max_pixels)
        except ImageError as e:
            return str(e)
        except OSError as e:  # vanished, permission denied, ...
            return f"cannot read file ({e.strerror or e})"

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return dict(zip(paths, pool.map(probe, paths)))


def _shuffled_classes(samples: Sequence[Sample], seed: int) -> list[list[Sample]]:
    """Each class's samples (classes in label order), sorted by path and then shuffled by one generator seeded
    with `seed`: the same lists whatever the order of `samples`."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: s.path)
        rng.shuffle(items)
        out.append(items)
    return out


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic per-class split: each class with >= 2 images puts at least one in val. Multi-label images:
    iterative stratification, every label kept in train (`data/multilabel.py`)."""
    if any(s.labels for s in samples):
        parts = iterative_parts(samples, [s.labels for s in samples], [1 - val_fraction, val_fraction], seed,
                                key=lambda s: s.path)
        train, val = keep_every_label_in_first(parts, lambda s: s.labels)
        return train, val
    train: list[Sample] = []
    val: list[Sample] = []
    for items in _shuffled_classes(samples, seed):
        n_val = round(len(items) * val_fraction)
        if len(items) >= 2:
            n_val = min(max(n_val, 1), len(items) - 1)
        else:
            n_val = 0
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return train, val


def stratified_folds(samples: Sequence[Sample], k: int, seed: int) -> list[list[Sample]]:
    """k disjoint parts of `samples` that together hold every one once, each class dealt round-robin after a
    seeded shuffle (so every part has about 1/k of each class); deterministic."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2 (got {k})")
    if any(s.labels for s in samples):
        return iterative_parts(samples, [s.labels for s in samples], [1.0] * k, seed, key=lambda s: s.path)
    parts: list[list[Sample]] = [[] for _ in range(k)]
    start = 0  # the next class starts where the last one stopped: small classes do not all land in part 0
    for items in _shuffled_classes(samples, seed):
        for i, s in enumerate(items):
            parts[(start + i) % k].append(s)
        start = (start + len(items)) % k
    return parts


def _final_splits(root: Path, layout: str, parts: dict[str, Path], split_samples: dict[str, list[Sample]],
                  val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """train, val, test: the user's own splits, or val split off train (or off all the images)."""
    if "val" in parts:  # the user's own validation split (split folders, or a label file's split column)
        train, val, test = split_samples["train"], split_samples["val"], split_samples.get("test", [])
        if not val:
            raise UserError(f"The validation split {display_path(parts['val'])} holds no usable image: "
                            "add images to it or remove it.")
        return train, val, test
    primary = "train" if "train" in parts else "all"
    train, val = stratified_split(split_samples[primary], val_fraction, seed)
    test = split_samples.get("test", [])
    if not val:
        raise UserError(f"Too few images in {display_path(parts[primary])} to hold out a validation split "
                        "(each class needs at least 2 images).")
    if "test" in parts and not test:
        raise UserError(f"The test split {display_path(parts['test'])} holds no usable image: "
                        "add images to it or remove it.")
    return train, val, test


def read_exclude_list(path: str | Path | None) -> list[str] | None:
    """The paths of an --exclude file: one per line; blank lines and lines starting with # are ignored."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise UserError(f"Cannot read the --exclude file {display_path(path)}: {e.strerror or e}.") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _excluded_files(root: Path, all_paths: Sequence[str], exclude: Sequence[str]) -> set[str]:
    """The scanned files named by `exclude` (absolute, or relative to the working folder or to `root`).

    Every entry must name a scanned image file: a typo would otherwise train on the image it meant
    to leave out, silently.
    """
    by_real = {os.path.realpath(p): p for p in all_paths}
    found: set[str] = set()
    unknown = []
    for entry in exclude:
        candidates = [os.path.realpath(entry), os.path.realpath(root / entry)]
        hit = next((by_real[c] for c in candidates if c in by_real), None)
        if hit is None:
            unknown.append(entry)
        else:
            found.add(hit)
    if unknown:
        first = ", ".join(display_path(u) for u in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise UserError(f"--exclude: {len(unknown)} listed path(s) are not image files of {display_path(root)}: "
                        f"{first}. List paths as `finetune audit` prints them (absolute, or relative to the "
                        "working folder or to DATA_DIR), one per line.")
    return found


def _without_excluded(root: Path, files_per_part: dict[str, dict[str, list[str]]], exclude: Sequence[str] | None
                      ) -> tuple[dict[str, dict[str, list[str]]], set[str]]:
    if not exclude:
        return files_per_part, set()
    every = [p for per_class in files_per_part.values() for files in per_class.values() for p in files]
    excluded = _excluded_files(root, every, exclude)
    return ({part: {c: [p for p in files if p not in excluded] for c, files in per_class.items()}
             for part, per_class in files_per_part.items()}, excluded)


def base_folder(root: str | Path) -> Path:
    """The folder a data path's relative image paths start from: the data folder, or a label file's folder."""
    root = Path(root)
    return root.parent if is_label_file(root) else root


def data_name(root: str | Path) -> str:
    """What names a data path in run and output names: the folder's name, or a label file's without `.csv`."""
    root = Path(root).resolve()
    return root.stem if is_label_file(root) else root.name


def _folder_parts(root: Path) -> tuple[str, dict[str, Path], dict[str, dict[str, list[str]]], list[Skipped]]:
    if not root.exists():
        raise UserError(f"Data folder not found: {display_path(root)}")
    if not root.is_dir():
        raise UserError(f"Data path is not a folder or a .csv label file: {display_path(root)}")
    layout, parts = _detect_layout(root)
    return layout, parts, {name: _class_files(path) for name, path in parts.items()}, []


def _label_file_parts(listed: LabelFile, path: Path
                      ) -> tuple[str, dict[str, Path], dict[str, dict[str, list[str]]], list[Skipped]]:
    """A label file as the parts a folder would give: "csv" (val split off train), "csv-train-test" or
    "csv-splits" (its split column names a validation split)."""
    names = set(listed.parts)
    layout = "csv-splits" if "val" in names else "csv-train-test" if "test" in names else "csv"
    return layout, {name: path for name in listed.parts}, listed.parts, [Skipped(p, why) for p, why in listed.bad]


def _samples_of(per_class: dict[str, list[str]], classes: list[str], probed: dict[str, ImageInfo | str],
                label_sets: dict[str, tuple[str, ...]] | None) -> list[Sample]:
    """The readable images of one split: one Sample per image and class, or, multi-label (`label_sets`), one per
    image with every class it shows."""
    if label_sets is None:
        return [Sample(p, classes.index(c), probed[p]) for c in sorted(per_class) for p in per_class[c]
                if not isinstance(probed[p], str)]
    paths = sorted({p for files in per_class.values() for p in files if not isinstance(probed[p], str)})
    return [Sample(p, MULTI, probed[p], tuple(sorted(classes.index(c) for c in label_sets[p]))) for p in paths]


def _check_every_class_trains(root: Path, layout: str, parts: dict[str, Path], classes: list[str],
                              primary: dict[str, list[str]], primary_samples: list[Sample]) -> None:
    """UserError naming the first class that has no readable image in the training (or only) split."""
    present = Counter(label for s in primary_samples for label in (s.labels or (s.label,)))
    for idx, name in enumerate(classes):
        if present[idx] == 0:
            n_files = len(primary[name])
            if layout.startswith("csv"):
                raise UserError(f"Class {name!r} of {display_path(root)} has no usable training image: all "
                                f"{n_files} listed are unreadable. Fix its rows or remove them.")
            folder = parts.get("train", parts.get("all", root)) / name
            why = (f"all {n_files} image file(s) in it are unreadable" if n_files
                   else "it holds no image files (" + ", ".join(IMAGE_EXTENSIONS) + ")")
            raise UserError(f"Class folder {display_path(folder)} has no usable image: {why}. "
                            "Add images or remove the folder.")


def scan_folder(root: str | Path, val_fraction: float = 0.2, seed: int = 0,
                max_pixels: int = 89_478_485, exclude: Sequence[str] | None = None,
                min_classes: int = 2, multi_label: bool = False) -> FolderSplits:
    """Scan and validate an image folder; raise UserError for folders that cannot be trained on.

    Args:
        exclude: paths of images to leave out of every split (`--exclude`); nothing is moved or deleted.
        min_classes: 1 for commands that only look at the data (`finetune audit`).
        multi_label: the caller takes multi-label data (a label file's `labels` column); else it is refused.
    """
    root = Path(root)
    listed = read_label_file(root) if is_label_file(root) else None
    if listed is not None and listed.multi_label and not multi_label:
        raise UserError(f"{display_path(root)} lists several labels per image (a 'labels' column): this command "
                        "takes one label per image (train, plan and evaluate take several). Use a 'label' column, "
                        "one label per image.")
    if listed is not None:
        layout, parts, files_per_part, bad = _label_file_parts(listed, root)
    else:
        layout, parts, files_per_part, bad = _folder_parts(root)
    label_sets = listed.label_sets if listed is not None and listed.multi_label else None
    files_per_part, excluded = _without_excluded(base_folder(root), files_per_part, exclude)
    primary = files_per_part["train" if "train" in parts else "all"]
    classes = sorted(primary)
    where = display_path(parts.get('train', parts.get('all', root)))
    if not classes:
        raise UserError(f"No classes in {where}: expected one subfolder per class, each holding images (or a CSV "
                        "file with path and label columns).")
    if len(classes) < min_classes:
        raise UserError(f"Only one class ({classes[0]!r}) in {display_path(root)}: a classifier needs at least 2 "
                        "classes (one subfolder each, or two labels in a label file).")
    for part, per_class in files_per_part.items():
        extra = sorted(set(per_class) - set(classes))
        if extra:
            raise UserError(f"The {part} split of {display_path(root)} has class(es) {extra} "
                            f"that train does not have; classes must match across splits.")

    all_paths = [p for per_class in files_per_part.values() for files in per_class.values() for p in files]
    probed = _probe_all(all_paths, max_pixels)
    skipped = bad + [Skipped(display_path(p), r) for p, r in probed.items() if isinstance(r, str)]

    split_samples = {name: _samples_of(per_class, classes, probed, label_sets)
                     for name, per_class in files_per_part.items()}
    primary_samples = split_samples["train" if "train" in parts else "all"]
    _check_every_class_trains(root, layout, parts, classes, primary, primary_samples)
    train, val, test = _final_splits(root, layout, parts, split_samples, val_fraction, seed)
    result = FolderSplits(str(root), layout, classes, train, val, test, skipped,
                          sorted(display_path(p) for p in excluded), multi_label=label_sets is not None)
    if skipped:
        log.warning(result.skipped_report())
    return result


