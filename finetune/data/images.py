"""Reading one image file into an RGB PIL image, the same way everywhere.

Training, evaluation, TTA, feature extraction and serving all decode through `load_rgb`, so an
image means the same pixels in every stage. Handles EXIF orientation, grayscale, palette, alpha,
CMYK and 16-bit images, animated files (first frame), and refuses images larger than a pixel limit
before decoding them (decompression bombs).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 89_478_485

# We enforce our own, configurable limit before decoding; Pillow's global check would otherwise
# reject (or warn about) images below it with a different message.
Image.MAX_IMAGE_PIXELS = None


class ImageError(Exception):
    """A file that cannot be used as an image; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str


def display_path(path: str | os.PathLike) -> str:
    """A printable form of a path, also when the file name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def _open(source: str | os.PathLike | bytes, max_pixels: int | None) -> Image.Image:
    try:
        if isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            if os.path.getsize(source) == 0:
                raise ImageError("empty file (0 bytes)")
            img = Image.open(source)
    except ImageError:
        raise
    except OSError as e:
        if e.errno is not None:  # the path itself: missing, a folder, no permission (Pillow's own have none)
            raise ImageError(f"cannot read file ({e.strerror})") from None
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from None
    limit = max_pixels or DEFAULT_MAX_PIXELS
    if img.width * img.height > limit:
        raise ImageError(f"image is {img.width}x{img.height} = {img.width * img.height} pixels, "
                         f"more than the limit of {limit} (raise --max-image-pixels if it is genuine)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, correctly for 16-bit, alpha, palette and CMYK."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert clips 16-bit values at 255; scale the full range instead. Through a lookup table of
        # round(v / scale * 255) over 0..scale: the same pixels as that float formula without its float64
        # copies of the image (a 25M-pixel 16-bit PNG took 655 MB to decode with them).
        arr = np.array(img)
        scale = 65535 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255
        table = np.clip(np.arange(scale + 1, dtype=np.float64) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        np.clip(arr, 0, scale, out=arr)
        return Image.fromarray(table[arr], mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max(initial=0.0)
        arr = arr / hi if hi > 1.0 else arr
        return Image.fromarray(np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath: composite on white, as viewers show it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(source: str | os.PathLike | bytes, max_pixels: int | None = None,
             draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file (or bytes) to an upright RGB image.

    Args:
        source: a path or the file's bytes.
        max_pixels: refuse images with more pixels than this, before decoding.
        draft_size: if given, JPEGs may be decoded at a reduced scale (DCT scaling) as long as the
            result stays at least this large; a big speed-up for large photos and small models.

    Raises:
        ImageError: the file is missing, unreadable, empty, not an image, truncated, or too large.
    """
    return load_rgb_drafts(source, max_pixels, [draft_size])[0]


def load_rgb_drafts(source: str | os.PathLike | bytes, max_pixels: int | None,
                    draft_sizes: list[tuple[int, int] | None]) -> list[Image.Image]:
    """`load_rgb` of one file at each of `draft_sizes`, decoded once per distinct reduced scale: requests that
    JPEG's DCT scaling meets with the same scale share one decode (the usual case; equal requests open the file
    once), and each result is exactly what `load_rgb` returns for that size."""
    decoded: dict[tuple[int, int], Image.Image] = {}  # by the size the draft gave
    requested: dict[tuple[int, int] | None, Image.Image] = {}  # by the size asked for
    for draft_size in dict.fromkeys(draft_sizes):
        img = _open(source, max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                if draft_size is not None and img.format == "JPEG":
                    w, h = img.size
                    # draft keeps the result >= the requested size; ask for what covers the target
                    # after orientation (a rotated image swaps width and height).
                    side = max(draft_size)
                    scale = max(side / min(w, h), 1e-6)
                    img.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))
                size = img.size  # after draft: which scale the decode runs at
                if size in decoded:
                    img.close()
                else:
                    img.load()
                    decoded[size] = to_rgb(ImageOps.exif_transpose(img))
                requested[draft_size] = decoded[size]
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise ImageError(f"cannot decode image ({type(e).__name__}: {e})") from None
    return [requested[d] for d in draft_sizes]


def probe_image(path: str | Path, max_pixels: int | None = None) -> ImageInfo:
    """Fully decode a file (at reduced JPEG scale, so it is cheap) to prove it is usable.

    Returns the original size and mode, which the dataset profile uses.
    """
    img = _open(path, max_pixels)
    info = ImageInfo(img.width, img.height, img.mode)
    img.close()
    load_rgb(path, max_pixels, draft_size=(32, 32))
    return info
