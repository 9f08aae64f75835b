"""Domains for the scenario bench (issue 13): a compact pack of the shared sets, and shifted domains made from it.

    uv run --frozen python -m bench domains pack ../shared/data .bench-data/pack
    uv run --frozen python -m bench domains variants .bench-data/pack .bench-data/domains

`pack` copies hymenoptera, clothing and omniglot with their layouts, photos resized so the shorter side is at
most 256 px (mobilenetv2_100 at 224 px resizes to 256 before its centre crop, so training sees nothing more) and
re-encoded (WebP by default: JPEG at quality 85 makes clothing alone ~67 MiB, WebP at 70 keeps the pack under the
40 MiB that may travel to the GPU machine). Anything that is not a photo (omniglot's 1-bit PNGs, the licence, the
bad `imageNotFound.gif`) is copied as it is.

`variants` derives shifted domains from a pack (grayscale, negative, edge maps, heavy blur, texture crops,
stratified small subsets, and procedurally rendered patterns), keeps each source's val/test splits, and writes
`OUT/domains.json`: one manifest of every bench dataset, the three packed sets included, paths relative to it.

Both are deterministic (sorted files, fixed seeds) and spread files over processes (`--jobs`, default every core).
Stdlib, Pillow and numpy only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import random
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

BASE_SETS = ("hymenoptera", "clothing", "omniglot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # finetune.data.images'
PHOTO_EXTENSIONS = (".jpg", ".jpeg")
SPLIT_KEYS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
              "test": "test", "testing": "test"}
SHORT_SIDE = 256
MAX_PACK_MIB = 40.0
VARIANT_QUALITY = 90  # variants are made on the machine that runs the bench: they never travel
SEED = 13


# --- files and splits ----------------------------------------------------------------------------

def image_files(folder: Path) -> list[Path]:
    """Every image file below `folder` (nested folders included), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def split_roots(root: Path) -> dict[str, Path]:
    """Split folder name -> folder ("validation" stays "validation"); {"": root} for class folders."""
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    named = [d for d in dirs if d.name.lower() in SPLIT_KEYS]
    return {d.name: d for d in named} if named and len(named) == len(dirs) else {"": root}


def class_files(split_root: Path) -> dict[str, list[Path]]:
    return {d.name: image_files(d) for d in sorted(split_root.iterdir()) if d.is_dir()}


def describe(root: Path) -> dict:
    """Per-split image counts (keys train / val / test, or "unsplit" for class folders) and the classes."""
    splits, classes = {}, []
    for name, sroot in split_roots(root).items():
        per_class = class_files(sroot)
        classes = classes or sorted(per_class)
        splits[SPLIT_KEYS.get(name.lower(), "unsplit")] = sum(len(v) for v in per_class.values())
    return {"splits": splits, "classes": classes}


def mib(n_bytes: float) -> float:
    return n_bytes / 2 ** 20


def folder_bytes(root: Path) -> tuple[int, int]:
    """(apparent bytes, bytes on disk as `du` counts them) of every file below root."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files)


def run_tasks(fn, tasks: list, jobs: int) -> list:
    """fn over tasks in `jobs` processes (in this process when jobs == 1); results in task order."""
    if jobs <= 1 or len(tasks) < 2:
        return [fn(t) for t in tasks]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(fn, tasks, chunksize=max(1, len(tasks) // (jobs * 8)))


# --- pack ----------------------------------------------------------------------------------------

def upright(path: Path) -> Image.Image:
    """Decoded as finetune's loader sees it (EXIF orientation applied), RGB or L."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.copy() if im.mode in ("RGB", "L") else im.convert("RGB")


def shrink(im: Image.Image, short: int = SHORT_SIDE) -> Image.Image:
    w, h = im.size
    scale = short / min(w, h)
    if scale >= 1:
        return im
    return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS, reducing_gap=3.0)


def _pack_one(task: tuple[str, str, str, int]) -> str:
    src, dst, fmt, quality = task
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    if fmt == "copy":
        shutil.copyfile(src, dst)
        return dst
    try:
        im = shrink(upright(Path(src)))
    except OSError:  # not decodable: the scanner reports and skips it, so keep it as it is
        shutil.copyfile(src, dst)
        return dst
    if fmt == "webp":
        im.save(dst, "WEBP", quality=quality, method=6)
    else:
        im.save(dst, "JPEG", quality=quality, optimize=True, progressive=True)
    return dst


def pack(shared: Path, out: Path, fmt: str, quality: int, jobs: int, max_mib: float,
         archive: Path | None = None) -> int:
    tasks, names = [], set()
    for name in BASE_SETS:
        root = shared / name
        if not root.is_dir():
            raise SystemExit(f"{root} is not a folder: pack needs the shared sets {', '.join(BASE_SETS)}")
        for src in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = src.relative_to(shared)
            photo = src.suffix.lower() in PHOTO_EXTENSIONS
            dst = out / rel.with_suffix(f".{fmt}" if photo and fmt == "webp" else src.suffix)
            assert dst not in names, f"two files map to {dst}"
            names.add(dst)
            tasks.append((str(src), str(dst), fmt if photo else "copy", quality))
    started = time.perf_counter()
    run_tasks(_pack_one, tasks, jobs)
    seconds = time.perf_counter() - started
    print(f"packed {len(tasks)} files in {seconds:.1f}s ({jobs} processes; photos: {fmt} quality {quality}, "
          f"shorter side <= {SHORT_SIDE} px)")
    total_apparent = total_disk = 0
    for name in BASE_SETS:
        apparent, disk = folder_bytes(out / name)
        total_apparent, total_disk = total_apparent + apparent, total_disk + disk
        src_apparent, _ = folder_bytes(shared / name)
        print(f"  {name:<12} {mib(apparent):6.1f} MiB ({mib(disk):5.1f} MiB on disk; source {mib(src_apparent):6.1f} MiB)")
    print(f"  {'total':<12} {mib(total_apparent):6.1f} MiB ({mib(total_disk):5.1f} MiB on disk, as du counts; "
          f"limit {max_mib:g} MiB)")
    if archive is not None:
        write_archive(out, archive)
        print(f"  archive      {mib(archive.stat().st_size):6.1f} MiB  {archive} (one file: no per-file block slack; "
              f"unpack with `tar xzf {archive.name}`)")
    if mib(total_apparent) > max_mib:
        print(f"the pack is over {max_mib:g} MiB: lower --quality", file=sys.stderr)
        return 1
    return 0


def write_archive(folder: Path, path: Path) -> None:
    """A byte-for-byte reproducible .tar.gz of `folder` (sorted entries, zeroed times and owners): ~7000 small
    files take ~50% more room on disk than their bytes (4 KiB blocks), one archive does not."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in [folder, *sorted(folder.rglob("*"))]:
            tar.add(p, arcname=str(Path(folder.name) / p.relative_to(folder)), recursive=False, filter=clean)


# --- shifted domains -----------------------------------------------------------------------------

def gray(im: Image.Image) -> Image.Image:
    return ImageOps.grayscale(im)


def negative(im: Image.Image) -> Image.Image:
    return ImageOps.invert(im.convert("RGB"))


def edges(im: Image.Image) -> Image.Image:
    """Dark edge lines on white, like a line drawing."""
    e = ImageOps.grayscale(im).filter(ImageFilter.GaussianBlur(1)).filter(ImageFilter.FIND_EDGES)
    return ImageOps.invert(ImageOps.autocontrast(e, cutoff=2))


def blur(im: Image.Image) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(8))


def texture(im: Image.Image) -> Image.Image:
    """The central patch (a quarter of the shorter side) upscaled: the class must be read from the fabric."""
    w, h = im.size
    side = max(8, min(w, h) // 4)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((SHORT_SIDE, SHORT_SIDE), Image.BICUBIC)


TRANSFORMS = {"identity": None, "gray": gray, "negative": negative, "edges": edges, "blur": blur,
              "texture": texture}

PATTERN_CLASSES = ("stripes_horizontal", "stripes_vertical", "stripes_diagonal", "checkerboard", "dots", "waves",
                   "rings", "blobs")


def render_pattern(kind: str, seed: tuple[int, ...], size: int = SHORT_SIDE) -> Image.Image:
    """One image of a pattern class, every parameter drawn from `seed` (frequency, phase, angle jitter, colours,
    softness, noise), so classes differ by structure, not by colour."""
    rng = np.random.default_rng(list(seed))
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) / size) - 0.5
    jitter = np.deg2rad(rng.uniform(-12, 12))
    freq, phase = rng.uniform(3, 14), rng.uniform(0, 2 * np.pi)

    def along(theta: float) -> np.ndarray:
        return x * np.cos(theta) + y * np.sin(theta)

    if kind == "stripes_horizontal":
        v = np.sin(2 * np.pi * freq * along(np.pi / 2 + jitter) + phase)
    elif kind == "stripes_vertical":
        v = np.sin(2 * np.pi * freq * along(jitter) + phase)
    elif kind == "stripes_diagonal":
        v = np.sin(2 * np.pi * freq * along(rng.choice([-1, 1]) * np.pi / 4 + jitter) + phase)
    elif kind == "checkerboard":
        theta = rng.uniform(0, np.pi / 2)
        v = np.sin(2 * np.pi * freq * along(theta) + phase) * np.sin(2 * np.pi * freq * along(theta + np.pi / 2))
    elif kind == "dots":
        theta, period = rng.uniform(0, np.pi / 2), 1 / freq
        u, w = along(theta) + phase / 7, along(theta + np.pi / 2)
        du, dw = (u % period) / period - 0.5, (w % period) / period - 0.5
        v = rng.uniform(0.2, 0.4) - np.sqrt(du ** 2 + dw ** 2)
    elif kind == "waves":
        theta, amp, wfreq = rng.uniform(0, np.pi), rng.uniform(0.03, 0.08), rng.uniform(1.5, 4)
        v = np.sin(2 * np.pi * freq * (along(theta) + amp * np.sin(2 * np.pi * wfreq * along(theta + np.pi / 2)))
                   + phase)
    elif kind == "rings":
        cx, cy = rng.uniform(-0.3, 0.3, size=2)
        v = np.sin(2 * np.pi * freq * np.sqrt((x - cx) ** 2 + (y - cy) ** 2) + phase)
    elif kind == "blobs":
        cells = int(rng.integers(4, 12))
        low = Image.fromarray((rng.uniform(0, 255, (cells, cells))).astype(np.uint8))
        v = np.asarray(low.resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
        v = v - np.median(v)
    else:
        raise ValueError(f"unknown pattern {kind!r}; valid: {', '.join(PATTERN_CLASSES)}")
    sharpness = rng.uniform(1, 12)  # soft sine .. nearly binary
    v = np.tanh(sharpness * v) / np.tanh(sharpness)
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = bg + (fg - bg) * ((v + 1) / 2)[..., None]
    img += rng.normal(0, rng.uniform(0, 25), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class Variant:
    """A shifted domain: `transform` of `source` (a packed set, or "rendered"), `train_per_class` training images
    per class (None: all), the source's val/test kept. Unsplit sources get train/ and val/ folders of
    `train_per_class` and `val_per_class` images per class."""

    name: str
    source: str
    transform: str
    train_per_class: int | None = None
    val_per_class: int | None = None
    test_per_class: int | None = None  # rendered patterns only
    expected: str = ""  # the cell we expect it to land in (the bench measures it)


VARIANTS = (
    Variant("hymenoptera-gray", "hymenoptera", "gray", expected="small-similar"),
    Variant("hymenoptera-edges", "hymenoptera", "edges", expected="small-different"),
    Variant("clothing-small", "clothing", "identity", train_per_class=40, expected="small-similar"),
    Variant("clothing-gray", "clothing", "gray", expected="large-similar"),
    Variant("clothing-negative", "clothing", "negative", expected="large-different"),
    Variant("clothing-blur", "clothing", "blur", expected="large-different"),
    Variant("clothing-edges", "clothing", "edges", expected="large-different"),
    Variant("clothing-edges-small", "clothing", "edges", train_per_class=40, expected="small-different"),
    Variant("clothing-texture", "clothing", "texture", expected="large-different"),
    Variant("omniglot-small", "omniglot", "identity", train_per_class=40, val_per_class=80,
            expected="small-different"),
    Variant("patterns", "rendered", "patterns", train_per_class=150, val_per_class=40, test_per_class=40,
            expected="large-different"),
    Variant("patterns-small", "rendered", "patterns", train_per_class=30, val_per_class=40, test_per_class=40,
            expected="small-different"),
)
BASE_EXPECTED = {"hymenoptera": "small-similar", "clothing": "large-similar", "omniglot": "large-different"}


def _variant_one(task: tuple) -> str | None:
    kind, dst = task[0], Path(task[1])
    dst.parent.mkdir(parents=True, exist_ok=True)
    if kind == "render":
        render_pattern(task[2], task[3]).save(dst, "JPEG", quality=VARIANT_QUALITY)
        return str(dst)
    src, transform = task[2], task[3]
    if transform == "identity":
        shutil.copyfile(src, dst)
        return str(dst)
    try:
        im = upright(Path(src))
    except OSError:
        return None  # the bad file of hymenoptera: nothing to derive
    TRANSFORMS[transform](im).save(dst, "JPEG", quality=VARIANT_QUALITY)
    return str(dst)


def subsample(files: list[Path], n: int | None, seed: tuple) -> list[Path]:
    if n is None or len(files) <= n:
        return files
    return sorted(random.Random(repr(seed)).sample(files, n))


def variant_tasks(v: Variant, pack_dir: Path, out: Path) -> list[tuple]:
    root = out / v.name
    if v.source == "rendered":
        tasks = []
        counts = {"train": v.train_per_class, "val": v.val_per_class, "test": v.test_per_class}
        for split_i, (split, n) in enumerate(counts.items()):
            for c_i, cls in enumerate(PATTERN_CLASSES):
                # Seeds do not depend on the variant: patterns-small's images are the first of patterns'.
                tasks += [("render", root / split / cls / f"{cls}_{i:04d}.jpg", cls, (SEED, split_i, c_i, i))
                          for i in range(n or 0)]
        return tasks
    src_root = pack_dir / v.source
    if not src_root.is_dir():
        raise SystemExit(f"{src_root} is not a folder: run `domains.py pack` first")

    def dst_of(src: Path, base: Path, split_dir: str) -> Path:
        rel = src.relative_to(base)
        return root / split_dir / (rel if v.transform == "identity" else rel.with_suffix(".jpg"))

    tasks = []
    for split, sroot in split_roots(src_root).items():
        for cls, files in class_files(sroot).items():
            key = (SEED, v.source, cls)
            if split == "":  # class folders: a train and a val split of their own, disjoint
                assert v.train_per_class and v.val_per_class, f"{v.name}: an unsplit source needs both counts"
                picked = subsample(files, v.train_per_class + v.val_per_class, key)
                order = random.Random(repr(key)).sample(picked, len(picked))
                parts = {"train": sorted(order[:v.train_per_class]), "val": sorted(order[v.train_per_class:])}
            else:
                is_train = SPLIT_KEYS.get(split.lower()) == "train"
                parts = {split: subsample(files, v.train_per_class, key) if is_train else files}
            for split_dir, chosen in parts.items():
                tasks += [("derive", dst_of(f, sroot, split_dir), str(f), v.transform) for f in chosen]
    return tasks


def variants(pack_dir: Path, out: Path, jobs: int, only: list[str] | None) -> int:
    chosen = [v for v in VARIANTS if not only or v.name in only]
    unknown = sorted(set(only or ()) - {v.name for v in VARIANTS})
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(v.name for v in VARIANTS)}")
    for v in chosen:
        if (out / v.name).exists():
            shutil.rmtree(out / v.name)  # a rerun writes the same files; stale ones must not linger
    tasks = [t for v in chosen for t in variant_tasks(v, pack_dir, out)]
    started = time.perf_counter()
    results = run_tasks(_variant_one, tasks, jobs)
    seconds = time.perf_counter() - started
    failed = sum(r is None for r in results)
    print(f"wrote {len(tasks) - failed} images of {len(chosen)} variants in {seconds:.1f}s ({jobs} processes)"
          + (f"; {failed} undecodable source file(s) skipped" if failed else ""))
    manifest = {"about": "bench datasets (bench/domains.py); paths relative to this file", "datasets": {}}
    for name in BASE_SETS:
        if (pack_dir / name).is_dir():
            manifest["datasets"][name] = {
                "path": os.path.relpath(pack_dir / name, out), "source": name, "transform": "none",
                **describe(pack_dir / name), "expected": BASE_EXPECTED[name]}
    for v in chosen:
        manifest["datasets"][v.name] = {
            "path": v.name, "source": v.source, "transform": v.transform, **describe(out / v.name),
            "train_per_class": v.train_per_class, "expected": v.expected}
    (out / "domains.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{'dataset':<22} {'transform':<9} {'train':>6} {'val':>5} {'test':>5} {'cls':>4} {'/cls':>5}  expected")
    for name, d in manifest["datasets"].items():
        s, k = d["splits"], len(d["classes"])
        train = s.get("train", s.get("unsplit", 0))
        print(f"{name:<22} {d['transform']:<9} {train:>6} {s.get('val', '-'):>5} {s.get('test', '-'):>5} {k:>4} "
              f"{train / k:>5.0f}  {d['expected']}")
    print(f"manifest: {out / 'domains.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="compact copy of the shared sets")
    p.add_argument("shared", type=Path, help="the shared data folder (holding hymenoptera, clothing, omniglot)")
    p.add_argument("out", type=Path)
    p.add_argument("--format", choices=("webp", "jpeg"), default="webp")
    p.add_argument("--quality", type=int, default=70)
    p.add_argument("--max-mib", type=float, default=MAX_PACK_MIB)
    p.add_argument("--archive", type=Path, help="also write the pack as one reproducible .tar.gz (what travels)")
    v = sub.add_parser("variants", help="shifted domains of a pack, and domains.json")
    v.add_argument("pack", type=Path)
    v.add_argument("out", type=Path)
    v.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    for q in (p, v):
        q.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.command == "pack":
        return pack(args.shared, args.out, args.format, args.quality, args.jobs, args.max_mib, args.archive)
    return variants(args.pack, args.out, args.jobs, [n for n in args.only.split(",") if n] or None)
