"""Turn a real photo or drawing of one clothing article into a Fashion-MNIST-like 28x28 input.

Fashion-MNIST images are a light article on a black background, trimmed to the
article and fitted into 28x28 keeping the aspect ratio. Real images are usually a
dark article on a light background, in colour, of any size: this module decodes
them safely (Pillow), converts to grey, inverts when the background is light,
crops to the article and fits it into 28x28. The CLI, the HTTP API and the web
page all go through :func:`prepare_image`. Needs only NumPy and Pillow.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist.config import IMAGE_SIZE

# Limits that keep a hostile upload from exhausting memory or time.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_ASPECT_RATIO = 20.0
MIN_SIDE = 4
# A pixel darker/lighter than the background by this much (out of 255) counts as the article.
FOREGROUND_THRESHOLD = 30


class ImageError(ValueError):
    """The input is not an image this classifier can use; the message says why and what to do."""


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageError("empty input: send the bytes of a PNG, JPEG, WebP, BMP or GIF image.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageError(f"image too large: {len(data):,} bytes, the limit is {MAX_UPLOAD_BYTES:,}.")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"image too large: {width}x{height} pixels, the limit is {MAX_PIXELS:,} pixels.")
        if min(width, height) < MIN_SIDE:
            raise ImageError(f"image too small: {width}x{height}; each side needs at least {MIN_SIDE} pixels.")
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise ImageError(f"absurd aspect ratio {width}x{height}; crop the image around the article.")
        image.seek(0)  # The first frame of an animation.
        if image.format == "JPEG":
            # Let the decoder downscale by a power of two while decoding: much faster for camera frames.
            image.draft(image.mode, (4 * IMAGE_SIZE, 4 * IMAGE_SIZE))
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"image rejected as a decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        raise ImageError("not an image (or an unsupported format): use PNG, JPEG, WebP, BMP or GIF.") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"truncated or corrupt image: {error}") from error
    return image


def to_grey(image: Image.Image) -> np.ndarray:
    """Any mode (palette, RGB, RGBA, 16-bit, ...) to a float32 array in [0, 255], at most 8x28 pixels a side."""
    image = ImageOps.exif_transpose(image)
    if max(image.size) > 8 * IMAGE_SIZE and image.mode in ("L", "RGB", "RGBA", "LA", "P"):
        # Finding the article needs no more resolution than this; shrinking first keeps big photos cheap.
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else image.mode)
        image.thumbnail((8 * IMAGE_SIZE, 8 * IMAGE_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return np.clip(array / top * 255.0, 0, 255)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        return np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas are background: put them on white, the usual backdrop of product photos.
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(backdrop, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def border_median(array: np.ndarray) -> float:
    """The median of the outermost rows and columns: the background's level."""
    return float(np.median(np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])))


def to_model_input(grey: np.ndarray) -> np.ndarray:
    """A grey array in [0, 255] to a Fashion-MNIST-like float32 (28, 28) in [0, 1]."""
    background = border_median(grey)
    if background > 127:
        # Light background: invert so the article is light on black.
        grey, background = 255.0 - grey, 255.0 - background
    grey = np.clip(grey - background, 0, 255)
    mask = grey > FOREGROUND_THRESHOLD
    if mask.any():
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        grey = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    peak = grey.max()
    if peak > 0:
        grey = grey * (255.0 / peak)
    article = Image.fromarray(grey.astype(np.uint8), mode="L")
    scale = IMAGE_SIZE / max(article.size)
    size = (max(1, round(article.width * scale)), max(1, round(article.height * scale)))
    article = article.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    canvas.paste(article, ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def prepare_image(source: bytes | str | os.PathLike[str]) -> np.ndarray:
    """Bytes or a path of any common image format -> float32 (28, 28) in [0, 1], ready to classify."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such file.")
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise ImageError(f"{path}: {path.stat().st_size:,} bytes, the limit is {MAX_UPLOAD_BYTES:,}.")
        source = path.read_bytes()
    image = _open(source)
    if image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "L":
        array = np.asarray(image, dtype=np.float32)
        if border_median(array) <= 127:
            # Already a Fashion-MNIST image (light on black, 28x28): use it as it is.
            return array / 255.0
    return to_model_input(to_grey(image))


Image.MAX_IMAGE_PIXELS = MAX_PIXELS
