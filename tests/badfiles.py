"""Generators of awkward and broken image files, shared by the training and batch-prediction tests.

Each `BadFile` writes one file into a folder and says what must happen to it: either it is usable
(`usable=True`, and `check` verifies the decoded pixels are the right ones), or it is skipped with a
reason containing `reason`. Folder-level oddities (hidden files, `__MACOSX`, symlink loops) have their
own helpers below.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

RED = (220, 30, 30)


def _noise(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def truncated_jpeg(folder: Path) -> Path:
    buf = io.BytesIO()
    _noise((96, 96)).save(buf, "JPEG", quality=95)
    path = folder / "truncated.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def zero_byte(folder: Path) -> Path:
    path = folder / "empty.jpg"
    path.write_bytes(b"")
    return path


def text_as_jpg(folder: Path) -> Path:
    path = folder / "notes.jpg"
    path.write_text("this is a text file with an image extension\n")
    return path


def animated_gif(folder: Path) -> Path:
    path = folder / "animated.gif"
    frames = [Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), (30, 30, 220))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def cmyk_jpeg(folder: Path) -> Path:
    path = folder / "cmyk.jpg"
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # pure red in CMYK
    return path


def png_16bit(folder: Path) -> Path:
    path = folder / "gray16.png"
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(path)  # mid-gray in 16 bits
    return path


def rgba_png(folder: Path) -> Path:
    path = folder / "rgba.png"
    arr = np.zeros((40, 40, 4), dtype=np.uint8)
    arr[:, :20] = (*RED, 255)  # left half opaque red, right half fully transparent (black underneath)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def palette_png(folder: Path) -> Path:
    path = folder / "palette.png"
    img = Image.new("P", (40, 40), 1)
    img.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    img.save(path, transparency=0)  # index 0 transparent, the image itself all index 1 (red)
    return path


def exif_rotated_jpeg(folder: Path) -> Path:
    """Stored 60 wide x 40 high, EXIF orientation 6: viewers show it 40 wide x 60 high."""
    path = folder / "rotated.jpg"
    img = Image.new("RGB", (60, 40), RED)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif.tobytes())
    return path


def pixel_bomb_png(folder: Path, side: int = 50_000) -> Path:
    """A PNG header claiming side x side pixels with no pixel data: decoding it would fail differently
    (or exhaust memory for a real bomb), so the 'limit' message proves it was refused before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path = folder / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def non_utf8_name(folder: Path) -> Path:
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9-\xff.png")))
    Image.new("RGB", (40, 40), RED).save(path, "PNG")
    return path


def _mean_rgb(img: Image.Image) -> tuple[float, ...]:
    return tuple(np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0))


def _close(a, b, tol=12.0) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@dataclass(frozen=True)
class BadFile:
    name: str
    make: Callable[[Path], Path]
    usable: bool
    reason: str = ""  # substring of the skip reason when not usable
    check: Callable[[Image.Image], bool] | None = None  # what the decoded RGB image must look like

    def __repr__(self) -> str:
        return self.name


BAD_FILES = [
    BadFile("truncated-jpeg", truncated_jpeg, False, "cannot decode image"),
    BadFile("zero-byte", zero_byte, False, "empty file (0 bytes)"),
    BadFile("text-as-jpg", text_as_jpg, False, "not a readable image"),
    BadFile("pixel-bomb", pixel_bomb_png, False, "more than the limit of"),
    BadFile("animated-gif", animated_gif, True, check=lambda im: _close(_mean_rgb(im), RED)),  # first frame
    BadFile("cmyk-jpeg", cmyk_jpeg, True, check=lambda im: _close(_mean_rgb(im), (255, 0, 0), 20)),
    BadFile("png-16bit", png_16bit, True, check=lambda im: _close(_mean_rgb(im), (128, 128, 128), 2)),
    BadFile("rgba-png", rgba_png, True,  # transparent half composited on white, not black
            check=lambda im: _close(_mean_rgb(im.crop((0, 0, 20, 40))), RED, 2)
            and _close(_mean_rgb(im.crop((20, 0, 40, 40))), (255, 255, 255), 2)),
    BadFile("palette-png", palette_png, True, check=lambda im: _close(_mean_rgb(im), RED, 2)),
    BadFile("exif-rotated-jpeg", exif_rotated_jpeg, True, check=lambda im: im.size == (40, 60)),
    BadFile("non-utf8-name", non_utf8_name, True, check=lambda im: _close(_mean_rgb(im), RED, 2)),
]
USABLE = [b for b in BAD_FILES if b.usable]
UNUSABLE = [b for b in BAD_FILES if not b.usable]


def write_all(folder: Path, cases=BAD_FILES) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {case.name: case.make(folder) for case in cases}


def hidden_and_macosx(folder: Path) -> list[Path]:
    """Files that are not the user's images: dot files (AppleDouble `._x.jpg`) and `__MACOSX` folders,
    valid-looking but junk. Returns what was written, all of which must be ignored."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "._resource-fork.jpg", folder / ".hidden.png"]
    written[0].write_bytes(b"\x00\x05\x16\x07AppleDouble junk")
    Image.new("RGB", (40, 40), RED).save(written[1])
    mac = folder / "__MACOSX"
    mac.mkdir(exist_ok=True)
    written.append(mac / "._also-junk.jpg")
    written[2].write_bytes(b"\x00\x05\x16\x07AppleDouble junk")
    return written


def symlink_loop(folder: Path) -> Path:
    """A link back to its own parent folder: a naive recursive walk never ends."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "loop"
    link.symlink_to(folder.resolve(), target_is_directory=True)
    return link
