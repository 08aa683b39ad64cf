"""Mutated PNG, JPEG, GIF, WebP and BMP files: prepare_image returns a model input or raises ImageError, nothing else.

Each case starts from a valid file of the format (several modes and variants of each), applies one to
three mutations (bit flips, byte overwrites, overwrites just after a structure's tag such as EXIF, a
palette or a Huffman table, truncation, duplicated chunks or byte ranges, header size fields set to
extreme values) drawn from ``numpy.random.default_rng([FMNIST_FUZZ_SEED, format index, case])``, so a
failure reproduces from the seed, the format and the case number given in its message. FMNIST_FUZZ_CASES
(default 10,000: about 5 s on 2 cores) is the total, shared among the five formats; FMNIST_FUZZ_SEED
defaults to 0. Runs of 850,000 cases in all found one escape, fixed in fmnist.preprocess.upright.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from fmnist.preprocess import PNG_SIGNATURE, ImageError, prepare_image

CASES = int(os.environ.get("FMNIST_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("FMNIST_FUZZ_SEED", "0"))
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
# Pillow warns about the corrupt EXIF, APNG and MPO data the mutations make; that is not a failure.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
# Values that tend to break size arithmetic, for header fields of 1 to 4 bytes.
EXTREMES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFF, 0xFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


def article(width: int = 48, height: int = 40, colour: bool = True) -> Image.Image:
    """A dark article on a light page, with some texture so that every encoder has something to code."""
    rng = np.random.default_rng(7)
    page = np.full((height, width, 3), 235, dtype=np.uint8)
    page[6:-6, 12:-12] = (40, 60, 120) if colour else (50, 50, 50)
    page[6:14, 6:-6] = (40, 60, 120) if colour else (50, 50, 50)
    page = np.clip(page.astype(int) + rng.integers(-12, 13, size=page.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(page)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees.
    exif[0x010F] = "fuzz"  # Make.
    return exif.tobytes()


def seed_files() -> dict[str, list[bytes]]:
    """Valid files of each format, in several modes and variants, to mutate."""
    rgb = article()
    grey = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.asarray(grey) > 200, 0, 255).astype(np.uint8)))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    text = PngImagePlugin.PngInfo()
    text.add_text("Title", "fuzz")
    text.add_text("Comment", "compressed " * 20, zip=True)
    sixteen = Image.fromarray((np.asarray(grey).astype(np.uint16) * 257).astype(np.uint16))
    frames = [rgb, rgb.rotate(90), grey.convert("RGB")]
    return {
        "PNG": [
            encode(grey, "PNG"),
            encode(rgb, "PNG", pnginfo=text, exif=exif_rotated()),
            encode(rgba, "PNG"),
            encode(palette, "PNG", transparency=0),
            encode(sixteen, "PNG"),
            encode(grey.convert("1"), "PNG"),
            encode(rgba.convert("LA"), "PNG"),
            encode(rgb, "PNG", save_all=True, append_images=frames[1:]),
        ],
        "JPEG": [
            encode(rgb, "JPEG", quality=85, exif=exif_rotated()),
            encode(rgb, "JPEG", quality=70, progressive=True),
            encode(grey, "JPEG"),
            encode(rgb.convert("CMYK"), "JPEG"),
            encode(rgb, "JPEG", subsampling=0, optimize=True),
            encode(rgb, "MPO", save_all=True, append_images=frames[1:2]),
        ],
        "GIF": [
            encode(palette, "GIF", transparency=0, comment=b"fuzz"),
            encode(rgb, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
            encode(grey, "GIF", interlace=True),
        ],
        "WEBP": [
            encode(rgb, "WEBP", quality=80),
            encode(rgba, "WEBP", lossless=True, exif=exif_rotated()),
            encode(rgb, "WEBP", save_all=True, append_images=frames[1:], duration=100, exif=exif_rotated()),
        ],
        "BMP": [
            encode(rgb, "BMP"),
            encode(palette, "BMP"),
            encode(grey.convert("1"), "BMP"),
            encode(grey, "BMP"),
            encode(rgba, "BMP"),
        ],
    }


def pick(rng: np.random.Generator, size: int) -> int:
    return int(rng.integers(0, max(size, 1)))


def flip_bits(data: bytearray, rng: np.random.Generator) -> str:
    positions = [pick(rng, len(data)) for _ in range(int(rng.integers(1, 9)))]
    for position in positions:
        data[position] ^= 1 << int(rng.integers(0, 8))
    return f"flip bits at {positions}"


def overwrite_bytes(data: bytearray, rng: np.random.Generator) -> str:
    start = pick(rng, len(data))
    values = rng.choice([0x00, 0xFF, 0x7F, 0x80, *range(256)], size=int(rng.integers(1, 9))).astype(np.uint8)
    data[start : start + len(values)] = values.tobytes()
    return f"overwrite {len(values)} bytes at {start}"


def truncate(data: bytearray, rng: np.random.Generator) -> str:
    length = pick(rng, len(data))
    del data[length:]
    return f"truncate to {length} bytes"


def duplicate_range(data: bytearray, rng: np.random.Generator) -> str:
    start = pick(rng, len(data))
    length = int(rng.integers(1, max(2, len(data) // 4)))
    target = pick(rng, len(data))
    data[target:target] = data[start : start + length]
    return f"copy bytes {start}:{start + length} to {target}"


# Places where parsers read structured fields: EXIF (TIFF) headers, MPO indexes, palettes and
# transparency, animation control, Huffman and quantisation tables, GIF extensions.
LANDMARKS = (
    b"Exif",
    b"II*\x00",
    b"MM\x00*",
    b"MPF\x00",
    b"eXIf",
    b"PLTE",
    b"tRNS",
    b"acTL",
    b"fcTL",
    b"zTXt",
    b"\xff\xc4",
    b"\xff\xdb",
    b"\xff\xda",
    b"\x21\xf9",
    b"\x21\xfe",
    b"NETSCAPE",
    b"ANIM",
    b"ANMF",
    b"ALPH",
)


def overwrite_near_landmark(data: bytearray, rng: np.random.Generator) -> str:
    """Overwrite a few bytes just after a structure's tag, where its fields are read."""
    found = [at for landmark in LANDMARKS if (at := bytes(data).find(landmark)) >= 0]
    if not found:
        return overwrite_bytes(data, rng)
    start = found[pick(rng, len(found))] + int(rng.integers(0, 48))
    values = rng.choice([*EXTREMES[:6], *range(256)], size=int(rng.integers(1, 5))).astype(np.uint8)
    data[start : start + len(values)] = values.tobytes()
    return f"overwrite {len(values)} bytes at {start}"


def png_chunk_spans(data: bytes) -> list[tuple[int, int]]:
    spans, position = [], len(PNG_SIGNATURE)
    while position + 12 <= len(data):
        end = position + 12 + int.from_bytes(data[position : position + 4], "big")
        spans.append((position, min(end, len(data))))
        position = end
    return spans


def jpeg_segment_spans(data: bytes) -> list[tuple[int, int]]:
    spans, position = [], 2
    while position + 4 <= len(data) and data[position] == 0xFF and data[position + 1] != 0xDA:
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        spans.append((position, min(end, len(data))))
        position = end
    return spans


def duplicate_chunk(data: bytearray, rng: np.random.Generator, image_format: str) -> str:
    """Repeat one whole PNG chunk or JPEG header segment (a palette, a table, a frame header...)."""
    spans = {"PNG": png_chunk_spans, "JPEG": jpeg_segment_spans}.get(image_format, lambda _: [])(bytes(data))
    if not spans:
        return duplicate_range(data, rng)
    start, end = spans[pick(rng, len(spans))]
    copies = int(rng.choice([1, 2, 50]))
    data[end:end] = bytes(data[start:end]) * copies
    return f"repeat chunk {start}:{end} {copies} times"


def size_fields(data: bytes, image_format: str) -> list[tuple[int, int, str]]:
    """(offset, byte count, byte order) of the width and height fields in the file's headers."""
    if image_format == "PNG":
        return [(16, 4, "big"), (20, 4, "big")]
    if image_format == "BMP":
        return [(18, 4, "little"), (22, 4, "little")]
    if image_format == "GIF":
        fields = [(6, 2, "little"), (8, 2, "little")]
        descriptor = data.find(b"\x2c", 13)
        if descriptor > 0:
            fields += [(descriptor + offset, 2, "little") for offset in (1, 3, 5, 7)]
        return fields
    if image_format == "JPEG":
        fields = []
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
            frame = data.find(marker)
            if frame > 0:
                fields += [(frame + 5, 2, "big"), (frame + 7, 2, "big")]
        return fields
    fields = []  # WebP.
    for chunk, offsets, width in ((b"VP8X", (12, 15), 3), (b"VP8L", (9,), 4), (b"VP8 ", (14, 16), 2)):
        at = data.find(chunk)
        if at > 0:
            fields += [(at + offset, width, "little") for offset in offsets]
    return fields


def set_size_field(data: bytearray, rng: np.random.Generator, image_format: str) -> str:
    fields = size_fields(bytes(data), image_format)
    if not fields:
        return overwrite_bytes(data, rng)
    offset, width, order = fields[pick(rng, len(fields))]
    top = (1 << (8 * width)) - 1
    value = int(rng.choice([*EXTREMES, pick(rng, top)])) & top
    data[offset : offset + width] = value.to_bytes(width, order)
    return f"size field at {offset} := {value}"


def fix_png_crcs(data: bytearray) -> None:
    """Recompute every chunk's CRC, so mutations reach past Pillow's CRC check."""
    for start, end in png_chunk_spans(bytes(data)):
        if end - start >= 12 and end <= len(data):
            data[end - 4 : end] = struct.pack(">I", zlib.crc32(bytes(data[start + 4 : end - 4])))


MUTATIONS: tuple[Callable[..., str], ...] = (
    flip_bits,
    overwrite_bytes,
    truncate,
    duplicate_range,
    overwrite_near_landmark,
    overwrite_near_landmark,
)


def fuzz_case(image_format: str, case: int, seed: int = SEED, files: dict[str, list[bytes]] | None = None):
    """The bytes and the description of one case: the same seed, format and case give the same bytes."""
    files = files or seed_files()
    rng = np.random.default_rng([seed, FORMATS.index(image_format), case])
    originals = files[image_format]
    which = pick(rng, len(originals))
    data = bytearray(originals[which])
    steps = [f"file {which}"]
    for _ in range(int(rng.integers(1, 4))):
        if not data:
            break
        choice = int(rng.integers(0, len(MUTATIONS) + 2))
        if choice == len(MUTATIONS):
            steps.append(set_size_field(data, rng, image_format))
        elif choice == len(MUTATIONS) + 1:
            steps.append(duplicate_chunk(data, rng, image_format))
        else:
            steps.append(MUTATIONS[choice](data, rng))
    if image_format == "PNG" and rng.random() < 0.5:
        fix_png_crcs(data)
        steps.append("CRCs fixed")
    return bytes(data), "; ".join(steps)


def outcome(data: bytes) -> str:
    """ "decoded" (a valid model input), "refused" (an ImageError), or what prepare_image did instead."""
    try:
        array = prepare_image(data)
    except ImageError:
        return "refused"
    except Exception as error:  # The test's point: any other exception is a failure.
        return f"raised {type(error).__name__}: {error}"
    if not (isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == (28, 28)):
        return f"returned {type(array).__name__} {getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}"
    if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        return f"returned values outside [0, 1]: {array.min()} .. {array.max()}"
    return "decoded"


def test_every_seed_file_is_accepted():
    for image_format, originals in seed_files().items():
        for index, data in enumerate(originals):
            assert Image.open(io.BytesIO(data)).format in (image_format, "MPO"), (image_format, index)
            array = prepare_image(data)
            assert array.shape == (28, 28) and array.max() > 0.5, (image_format, index)


@pytest.mark.parametrize("image_format", FORMATS)
def test_mutated_files_give_a_model_input_or_an_image_error(image_format, tmp_path):
    files = seed_files()
    cases = max(1, CASES // len(FORMATS))
    counts, failures = {"decoded": 0, "refused": 0}, []
    for case in range(cases):
        data, description = fuzz_case(image_format, case, files=files)
        result = outcome(data)
        if result in counts:
            counts[result] += 1
            continue
        kept = tmp_path / f"{image_format.lower()}_{case}.bin"
        kept.write_bytes(data)
        failures.append(f"case {case} ({description}): {result} [input kept in {kept}]")
    assert not failures, (
        f"{len(failures)} of {cases} {image_format} cases (FMNIST_FUZZ_SEED={SEED}) neither gave a model input nor "
        "raised ImageError; reproduce one with fuzz_case(format, case):\n" + "\n".join(failures[:20])
    )
    if cases >= 100:
        # The mutations must exercise both paths, or the test proves little.
        assert counts["decoded"] > cases // 20 and counts["refused"] > cases // 20, counts
