"""Image files for the runtime: listing them, decoding them safely, and the extractor's pre-processing.

numpy + Pillow only: this is what ``aoanet-infer --images`` runs and also what ``aoanet-data extract`` runs on the
training side, so that the features a model is trained on and those it is served with come from the same pixels.

* Decoding: EXIF orientation applied; greyscale, palette, CMYK, 16-bit and alpha images converted to RGB (alpha is
  composited onto white); the first frame of an animated or multi-page file. JPEGs are decoded at a reduced scale
  (Pillow's ``draft``: 1/2, 1/4 or 1/8, never below the size the extractor needs) so a huge photo costs little
  memory; any image still larger than ``max_pixels`` after that is refused before its pixels are decoded.
* Pre-processing (``preprocess``): resize to the spec's input size with its filter, scale to 0..1, subtract the
  mean and divide by the std per channel, HWC -> CHW float32.

Every failure is an ``ImageError`` whose message starts with the file's path.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "ImageError",
    "ImageRef",
    "list_image_files",
    "load_rgb",
    "preprocess",
    "probe",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LIST_SUFFIXES = (".txt", ".lst")
# Decoded pixels an image may have (after a JPEG's reduced-scale decoding): 64 Mpixels is 192 MB as RGB, the
# most one image may hold in memory at once. Larger files are refused before their pixels are decoded.
DEFAULT_MAX_PIXELS = 64_000_000
FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, KeyError)


class ImageError(ValueError):
    """An image that cannot be used: not an image, truncated, empty, too large (the message names the file)."""


class ImageTooLargeError(ImageError):
    """An image refused from its header for its size (more pixels than allowed)."""


@dataclass(frozen=True)
class ImageRef:
    image_id: int | str  # the file's stem; an int when it is all digits (COCO file names are not)
    path: Path


# ---------------------------------------------------------------------------------------------- listing
def _image_id(stem: str, coco_ids: bool = False) -> int | str:
    if coco_ids:  # COCO_val2014_000000391895 -> 391895
        digits = stem[len(stem.rstrip("0123456789")) :]
        if digits:
            return int(digits)
    return int(stem) if stem.isdigit() else stem


def _read_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError(f"{path}: cannot read the list of images ({e})") from None
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(p if p.is_absolute() else path.parent / p)
    if not out:
        raise ImageError(f"{path}: the list of images is empty")
    return out


def list_image_files(sources: Sequence[str | os.PathLike], coco_ids: bool = False) -> list[ImageRef]:
    """The images named by ``sources``, in order: a directory gives its image files (by suffix, sorted by name;
    not recursive), a ``.txt``/``.lst`` file a list of paths (one per line, relative to the list's folder), any
    other path itself. Ids are the file stems (``coco_ids``: the number that ends the stem, as in
    COCO_val2014_000000391895.jpg), which must be unique (one error lists every clash)."""
    paths: list[Path] = []
    for source in sources:
        p = Path(source)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise ImageError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            paths.extend(found)
        elif p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            paths.extend(_read_list(p))
        elif not p.exists():
            raise ImageError(f"{p}: no such file or directory")
        else:
            paths.append(p)
    by_id: dict[int | str, list[Path]] = {}
    for p in paths:
        by_id.setdefault(_image_id(p.stem, coco_ids), []).append(p)
    clashes = {k: v for k, v in by_id.items() if len(v) > 1}
    if clashes:
        lines = [f"{k}: {', '.join(map(str, v))}" for k, v in list(clashes.items())[:20]]
        raise ImageError(
            f"{len(clashes)} image id(s) name more than one file (ids are the file names without suffix):\n  "
            + "\n  ".join(lines)
        )
    return [ImageRef(_image_id(p.stem, coco_ids), p) for p in paths]


# ---------------------------------------------------------------------------------------------- decoding
def _open(path: Path):
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read it ({e})") from None
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    return _open_stream(path, path)


def _open_stream(source, where) -> Image.Image:
    """Pillow's lazy open (the header only) of a path or a file object; errors name ``where``."""
    try:
        with warnings.catch_warnings():
            # The size limit below is ours; Pillow's warning for large images would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{where}: image too large to decode ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{where}: not an image file Pillow can read (JPEG, PNG, BMP, GIF, WebP, TIFF ...)") from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"{where}: cannot read the image header ({type(e).__name__}: {e})") from None


def _orientation(img) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: no orientation, like any viewer
        return 1


def probe(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only; checks the file opens as
    an image and is not too large to decode (see ``load_rgb``)."""
    path = Path(path)
    with _open(path) as img:
        w, h = img.size
        fmt = img.format
        orientation = _orientation(img)
    _check_pixels(path, fmt, w, h, max_pixels, min_size)
    return (h, w) if orientation in _ROTATED else (w, h)


def _scaled_by_draft(fmt: str | None, w: int, h: int, min_size: int) -> tuple[int, int]:
    if fmt != "JPEG":
        return w, h
    scale = 1
    while scale < 8 and min(w, h) // (scale * 2) >= min_size:
        scale *= 2
    return -(-w // scale), -(-h // scale)


def _check_pixels(path: Path, fmt, w: int, h: int, max_pixels: int, min_size: int) -> None:
    if w < 1 or h < 1:
        raise ImageError(f"{path}: image of size {w}x{h}")
    dw, dh = _scaled_by_draft(fmt, w, h, min_size)
    if dw * dh > max_pixels:
        raise ImageTooLargeError(
            f"{path}: image of {w}x{h} pixels is too large (at most {max_pixels:,} decoded pixels; "
            f"{fmt or 'this format'} cannot be decoded at a reduced scale) - downscale it first"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit greyscale (PNG, TIFF): 0..65535 -> 0..255, not clipped at 255 as Pillow's own conversion does
        if mode != "I" or a.max(initial=0) > 255:
            a = a / 257.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "P":
        return img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(
    source, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1, name: str | None = None
) -> Image.Image:
    """An RGB ``PIL.Image`` from a path, the bytes of an image file, a ``PIL.Image`` or a uint8 array (H, W) or
    (H, W, 3|4).

    ``min_size``: the smallest side the caller will resize to; a JPEG is decoded at the coarsest scale (1/2, 1/4,
    1/8) that keeps both sides at least this large. Raises ImageError naming the file (or ``name``)."""
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source) or source)
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "array")
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = name or "image bytes"
        if not len(source):
            raise ImageError(f"{where}: empty (0 bytes)")
        with _open_stream(io.BytesIO(source), where) as img:
            return _decode(img, where, max_pixels, min_size)
    path = Path(source)
    with _open(path) as img:
        return _decode(img, path, max_pixels, min_size)


def _decode(img: Image.Image, where, max_pixels: int, min_size: int) -> Image.Image:
    """Decode an opened image after checking its size from the header (JPEGs at a reduced scale when that is
    enough), EXIF orientation applied, as RGB."""
    _check_pixels(where, img.format, *img.size, max_pixels, min_size)
    try:
        if img.format == "JPEG":
            w, h = _scaled_by_draft("JPEG", *img.size, min_size)
            img.draft("RGB", (w, h))
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{where}: out of memory while decoding the image") from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"{where}: truncated or corrupt image data ({type(e).__name__}: {e})") from None


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"{name}: image arrays must be uint8 (H, W) or (H, W, 3|4), got dtype {a.dtype}")
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.ndim == 3 and a.shape[2] in (3, 4) and a.shape[0] > 0 and a.shape[1] > 0:
        return _to_rgb(Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[2] == 3 else "RGBA"))
    raise ImageError(f"{name}: image arrays must be uint8 (H, W) or (H, W, 3|4), got shape {a.shape}")


# ---------------------------------------------------------------------------------------------- pre-processing
def preprocess(img: Image.Image, size: tuple[int, int], resize_filter: str, mean, std) -> np.ndarray:
    """RGB image -> float32 [3, height, width]: resized to ``size`` = (width, height) with ``resize_filter``,
    (pixel / 255 - mean) / std per channel."""
    if img.size != tuple(size):
        img = img.resize(tuple(size), FILTERS[resize_filter])
    x = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
