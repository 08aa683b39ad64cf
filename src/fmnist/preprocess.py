"""Turn a real photo or drawing of one clothing article into a Fashion-MNIST-like 28x28 input.

Fashion-MNIST images are a light article on a black background, trimmed to the
article and fitted into 28x28 keeping the aspect ratio. Real images are usually a
dark article on a light background, in colour, of any size: this module decodes
them safely (Pillow, five formats only, sizes checked from the header before any
pixel is decoded), converts to grey, inverts when the background is light, crops
to the article and fits it into 28x28. The CLI, the HTTP API and the web page all
go through :func:`prepare_image`. Needs only NumPy and Pillow.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

from fmnist.config import IMAGE_SIZE

# The formats Pillow may decode, and nothing else: TIFF, EPS (which would run Ghostscript), ICO, TGA, PPM,
# JPEG 2000 and the rest of Pillow's plugins never see an upload.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
ACCEPTED_FORMATS_TEXT = "PNG, JPEG, WebP, BMP or GIF"

# Limits that keep a hostile upload from exhausting memory or time.
# Phone photos are 3-8 MB as JPEG; nothing larger is needed, and every byte is held in memory once.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# The model sees 28x28 and the article is found on at most 224 pixels a side, so 2048x2048 decoded
# pixels are more than any answer needs. At 4 bytes a pixel (RGBA, CMYK) that is 16 MB per image, about
# twice that while converting to grey: 8 concurrent 2048x2048 RGBA PNGs peaked at 270 MB on 2 cores.
MAX_DECODED_PIXELS = 2048 * 2048
# A baseline JPEG is decoded at 1/2, 1/4 or 1/8 scale (draft), so it may claim more pixels than it decodes:
# 8192x8192 (a 50-megapixel phone camera fits) decodes to at most 1024x1024. Nothing may claim more.
MAX_HEADER_PIXELS = 8192 * 8192
# Pillow walks PNG chunks, JPEG markers and GIF blocks in Python: 10 MB of empty ones would keep it busy
# for seconds (and GIF comments cost hundreds of MB). Real images have a few dozen, at most some thousands
# of PNG data chunks.
MAX_SEGMENTS = 8192
# Stray bytes tolerated between JPEG markers (a few are common; Pillow skips each one in Python).
MAX_STRAY_JPEG_BYTES = 1024
# Each scan of a progressive JPEG costs the decoder a pass over the whole image; encoders write about 10.
MAX_JPEG_SCANS = 64
MAX_ASPECT_RATIO = 20.0
MIN_SIDE = 4
# Finding the article needs no more resolution than this, so larger images are shrunk to it first.
WORKING_SIZE = 8 * IMAGE_SIZE
# A pixel darker/lighter than the background by this much (out of 255) counts as the article.
FOREGROUND_THRESHOLD = 30

# What Pillow raised on corrupt or truncated files of the accepted formats in 850,000 fuzzed cases
# (tests/test_fuzz.py, Pillow 13): OSError (truncated data, decoder errors; UnidentifiedImageError is
# one), SyntaxError (broken PNG chunks, bad WebP data), ValueError (bad palettes, sizes, too much PNG
# text) and struct.error (corrupt EXIF tags, when ImageOps.exif_transpose rewrote them: upright() below
# no longer does). Image.open itself turns IndexError, TypeError and struct.error while reading a header
# into UnidentifiedImageError. Anything else is a bug to report, not bad input.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error)

# Modes with more than 8 bits a channel, scaled to [0, 255] by value rather than converted by Pillow (which clips).
HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# Modes that carry transparency, and the 8-bit mode each is resolved to.
ALPHA_MODES = {"LA": "LA", "La": "LA", "PA": "RGBA", "RGBA": "RGBA", "RGBa": "RGBA"}

# What makes an image upright for each EXIF orientation, as in ImageOps.exif_transpose.
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG frame markers (SOFn) and, among them, the sequential ones that libjpeg can decode as a stream.
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_SEQUENTIAL_MARKERS = frozenset({0xC0, 0xC1, 0xC9})


class ImageError(ValueError):
    """The input is not an image this classifier can use; the message says why and what to do."""


class JpegLayout(NamedTuple):
    """What a JPEG's markers up to its first scan say about decoding it."""

    segments: int
    stray_bytes: int
    streamed: bool


def jpeg_layout(data: bytes) -> JpegLayout:
    """Walk a JPEG's markers up to its first scan, counting them and telling whether libjpeg streams it.

    libjpeg decodes a sequential JPEG whose first scan carries every component a few rows at a time.
    A progressive JPEG, or one whose components come in separate scans, makes it keep the coefficients
    of the whole image (2 bytes a sample, whatever the draft scale), so its full size is what counts.
    The walk stops after ``MAX_SEGMENTS`` markers or ``MAX_STRAY_JPEG_BYTES`` stray bytes.
    """
    position, segments, stray, sequential, components = 2, 0, 0, False, 0
    while position + 4 <= len(data) and segments <= MAX_SEGMENTS and stray <= MAX_STRAY_JPEG_BYTES:
        marker = data[position + 1]
        if data[position] != 0xFF or marker in (0x00, 0xFF):
            # A stray byte or a fill byte before a marker.
            position, stray = position + 1, stray + 1
            continue
        segments += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            # Markers without a length field.
            position += 2
            continue
        if marker in JPEG_FRAME_MARKERS and not components and position + 9 < len(data):
            sequential, components = marker in JPEG_SEQUENTIAL_MARKERS, data[position + 9]
        elif marker == 0xDA:
            scan_components = data[position + 4] if position + 4 < len(data) else 0
            return JpegLayout(segments, stray, sequential and scan_components == components > 0)
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return JpegLayout(segments, stray, False)


def png_chunks(data: bytes) -> int:
    """The number of chunks of a PNG, up to its end or ``MAX_SEGMENTS + 1``."""
    position, chunks = len(PNG_SIGNATURE), 0
    while position + 8 <= len(data) and chunks <= MAX_SEGMENTS:
        chunks += 1
        if data[position + 4 : position + 8] == b"IEND":
            break
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return chunks


def gif_blocks(data: bytes) -> int:
    """The number of data sub-blocks before a GIF's first image, up to ``MAX_SEGMENTS + 1``."""
    if len(data) < 13:
        return 0
    position, blocks = 13, 0
    if data[10] & 0x80:
        # The global colour table.
        position += 3 << ((data[10] & 0x07) + 1)
    while position + 1 < len(data) and data[position] == 0x21 and blocks <= MAX_SEGMENTS:
        # An extension: its label, then sub-blocks until an empty one.
        position += 2
        while position < len(data) and blocks <= MAX_SEGMENTS:
            size = data[position]
            position, blocks = position + 1 + size, blocks + 1
            if size == 0:
                break
    return blocks


def check_structure(data: bytes) -> None:
    """Refuse files whose headers Pillow would walk slowly, block by block, before Pillow sees them."""
    if data.startswith(PNG_SIGNATURE):
        segments, stray = png_chunks(data), 0
    elif data.startswith(b"\xff\xd8"):
        segments, stray, _ = jpeg_layout(data)
        # Entropy-coded data never holds FF DA (an FF there is followed by 00 or a restart marker).
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise ImageError(
                f"corrupt or hostile JPEG: {scans:,} scans, over the {MAX_JPEG_SCANS} any encoder writes; "
                "re-save it with an ordinary image editor."
            )
    elif data.startswith((b"GIF87a", b"GIF89a")):
        segments, stray = gif_blocks(data), 0
    else:
        return
    if segments > MAX_SEGMENTS or stray > MAX_STRAY_JPEG_BYTES:
        raise ImageError(
            f"corrupt or hostile image: more than {MAX_SEGMENTS:,} chunks or {MAX_STRAY_JPEG_BYTES:,} stray bytes "
            "in its header; re-save it with an ordinary image editor."
        )


def check_size(width: int, height: int, decoded_pixels: int, how: str) -> None:
    """Refuse a header size no answer needs, before decoding; ``decoded_pixels`` is what the decoder will hold."""
    if width * height > MAX_HEADER_PIXELS:
        raise ImageError(
            f"image too large: {width}x{height} pixels, the limit is {MAX_HEADER_PIXELS:,} pixels; "
            "scale it down to at most 2048 pixels a side."
        )
    if decoded_pixels > MAX_DECODED_PIXELS:
        raise ImageError(
            f"image too large: {width}x{height} pixels ({how}), the limit is {MAX_DECODED_PIXELS:,} decoded "
            "pixels; scale it down to at most 2048 pixels a side."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image too small: {width}x{height}; each side needs at least {MIN_SIDE} pixels.")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageError(f"absurd aspect ratio {width}x{height}; crop the image around the article.")


def upright(image: Image.Image) -> Image.Image:
    """Apply a photo's EXIF orientation (phones store pictures sideways), reading nothing else of its EXIF.

    Unlike ``ImageOps.exif_transpose`` this does not rewrite the EXIF block, which fails on corrupt tags.
    """
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    method = ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def decode(data: bytes) -> Image.Image:
    """Bytes of a PNG, JPEG, WebP, BMP or GIF (first frame) -> a loaded, upright Pillow image.

    Sizes are checked from the header before decoding; a JPEG is reduced while decoding (draft) to the
    smallest power-of-two scale that keeps ``WORKING_SIZE`` pixels a side. Any failure is an ``ImageError``.
    """
    if not data:
        raise ImageError(f"empty input: send the bytes of a {ACCEPTED_FORMATS_TEXT} image.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageError(f"image too large: {len(data):,} bytes, the limit is {MAX_UPLOAD_BYTES:,}.")
    check_structure(data)
    try:
        # Pillow opens an animation at its first frame.
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        width, height = image.size
        decoded_pixels, how = width * height, f"{image.format} decodes at full size"
        if isinstance(image, JpegImagePlugin.JpegImageFile):
            # A colour JPEG decodes straight to grey (its Y channel is the luma Pillow would compute).
            image.draft("L" if image.mode in ("L", "RGB") else image.mode, (WORKING_SIZE, WORKING_SIZE))
            if jpeg_layout(data).streamed:
                decoded_pixels, how = image.width * image.height, f"decoded at {image.width}x{image.height}"
            else:
                how = "a progressive or multi-scan JPEG, whose decoder holds it at full size"
        check_size(width, height, decoded_pixels, how)
        image.load()
        image = upright(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large: {error} Scale it down to at most 2048 pixels a side.") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"not an image, or not an accepted format: send a {ACCEPTED_FORMATS_TEXT} image.") from error
    except DECODE_ERRORS as error:
        raise ImageError(
            f"truncated or corrupt image ({type(error).__name__}: {error}); re-save or re-send it."
        ) from error
    return image


def shrink(image: Image.Image) -> Image.Image:
    """Fit ``image`` within ``WORKING_SIZE`` pixels a side (a new image), or return it when it already fits."""
    scale = WORKING_SIZE / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Pillow resizes LA and RGBA with premultiplied alpha, so transparent pixels do not bleed their colour.
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def high_depth_levels(image: Image.Image) -> np.ndarray:
    """An I, I;16 (any byte order) or F image -> float32 grey levels in [0, 255], scaled by value."""
    levels = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        levels = np.nan_to_num(levels, nan=0.0, posinf=255.0, neginf=0.0)
        top = 1.0 if levels.max(initial=0.0) <= 1.0 else 255.0
    elif image.mode.startswith("I;16"):
        top = 65535.0
    else:
        # 32-bit integers: 16-bit data when any value needs more than 8 bits, else 8-bit data.
        top = 65535.0 if levels.max(initial=0.0) > 255 else 255.0
    levels = np.clip(levels * np.float32(255.0 / top), 0, 255)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int) and image.mode != "F":
        # A PNG's transparent grey level is background: white, as for alpha below.
        levels[np.asarray(image) == transparent] = 255.0
    return levels


def eight_bit(image: Image.Image) -> Image.Image:
    """Any mode -> L, LA, RGB or RGBA that looks the same (palettes, bilevel, premultiplied alpha, CMYK,
    YCbCr, LAB and HSV resolved; a transparent colour or palette entry turned into alpha)."""
    transparent = "transparency" in image.info
    if image.mode in ALPHA_MODES:
        return image.convert(ALPHA_MODES[image.mode]) if image.mode != ALPHA_MODES[image.mode] else image
    if image.mode in ("L", "RGB") and not transparent:
        return image
    if image.mode in ("1", "L"):
        return image.convert("LA" if transparent else "L")
    return image.convert("RGBA" if transparent else "RGB")


def to_grey(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> float32 (H, W) grey levels in [0, 255], at most ``WORKING_SIZE`` pixels a side.

    Colour becomes luma (ITU-R 601, as Pillow's "L"); 16-bit and float images are scaled by value;
    transparent areas are put on white, the usual backdrop of product photos.
    """
    if image.mode in HIGH_DEPTH_MODES:
        return np.asarray(shrink(Image.fromarray(high_depth_levels(image))), dtype=np.float32)
    image = shrink(eight_bit(image))
    levels = np.asarray(image.convert("L"), dtype=np.float32)
    if image.mode in ("LA", "RGBA"):
        opacity = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
        levels = levels * opacity + 255.0 * (1.0 - opacity)
    return levels


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
    article = Image.fromarray(grey.astype(np.uint8))
    scale = IMAGE_SIZE / max(article.size)
    size = (max(1, round(article.width * scale)), max(1, round(article.height * scale)))
    article = article.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    canvas.paste(article, ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def read_file(path: Path) -> bytes:
    """The bytes of an image file, at most ``MAX_UPLOAD_BYTES``; any problem is an ``ImageError``."""
    try:
        status = path.stat()
        if stat.S_ISDIR(status.st_mode):
            raise ImageError(f"{path}: is a directory; give the path of an image file.")
        if not stat.S_ISREG(status.st_mode):
            raise ImageError(f"{path}: not a regular file; give the path of an image file.")
        if status.st_size > MAX_UPLOAD_BYTES:
            raise ImageError(f"{path}: {status.st_size:,} bytes, the limit is {MAX_UPLOAD_BYTES:,}.")
        with path.open("rb") as file:
            # Read one byte more than allowed, so a file that grew since stat() is still caught.
            data = file.read(MAX_UPLOAD_BYTES + 1)
    except FileNotFoundError as error:
        raise ImageError(f"{path}: no such file.") from error
    except IsADirectoryError as error:
        raise ImageError(f"{path}: is a directory; give the path of an image file.") from error
    except PermissionError as error:
        raise ImageError(f"{path}: permission denied; make the file readable or copy it elsewhere.") from error
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror or error}).") from error
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageError(f"{path}: over {MAX_UPLOAD_BYTES:,} bytes, the limit.")
    return data


def prepare_image(source: bytes | str | os.PathLike[str]) -> np.ndarray:
    """Bytes or a path of a PNG, JPEG, WebP, BMP or GIF -> float32 (28, 28) in [0, 1], ready to classify."""
    if isinstance(source, (str, os.PathLike)):
        source = read_file(Path(source))
    image = decode(source)
    if image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "L":
        array = np.asarray(image, dtype=np.float32)
        if border_median(array) <= 127:
            # Already a Fashion-MNIST image (light on black, 28x28): use it as it is.
            return array / 255.0
    return to_model_input(to_grey(image))


# Pillow's own check, which runs in Image.open before ours: it warns above this many pixels and refuses
# twice as many; decode() refuses anything above it, so Pillow's limit only matters to other callers.
Image.MAX_IMAGE_PIXELS = MAX_HEADER_PIXELS
