"""One preprocessing function for the CLI, the API and the page: real images in, Fashion-MNIST-like arrays out."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from fmnist import preprocess
from fmnist.preprocess import ImageError, prepare_image, to_grey, to_model_input


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def article(width: int = 120, height: int = 160, canvas: int = 240) -> np.ndarray:
    """A dark T-shirt-like blob on a white page, as a photo of a garment would look."""
    page = np.full((canvas, canvas), 245, dtype=np.uint8)
    top, left = (canvas - height) // 2, (canvas - width) // 2
    page[top : top + height, left : left + width] = 40
    page[top : top + height // 4, left - width // 4 : left + width + width // 4] = 40  # Sleeves.
    return page


def assert_fashion_mnist_like(array: np.ndarray) -> None:
    assert array.shape == (28, 28) and array.dtype == np.float32
    assert array.min() >= 0.0 and array.max() <= 1.0
    assert array[-3:, :3].mean() < 0.15 and array[-3:, -3:].mean() < 0.15, "the background must be black"
    assert array[10:18, 10:18].mean() > 0.6, "the article must be light and centred"


def test_a_fashion_mnist_image_passes_through_unchanged():
    rng = np.random.default_rng(0)
    original = np.zeros((28, 28), dtype=np.uint8)
    original[4:24, 6:22] = rng.integers(100, 256, size=(20, 16))
    array = prepare_image(encode(Image.fromarray(original, mode="L"), "PNG"))
    np.testing.assert_allclose(array, original / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "image_format"),
    [("L", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("P", "GIF"), ("RGB", "PNG")],
)
def test_common_formats_and_modes_become_light_on_black(mode, image_format):
    image = Image.fromarray(article(), mode="L").convert(mode)
    assert_fashion_mnist_like(prepare_image(encode(image, image_format)))


def test_transparent_background_counts_as_background():
    rgba = np.zeros((200, 200, 4), dtype=np.uint8)
    rgba[40:160, 60:140] = (30, 30, 120, 255)
    assert_fashion_mnist_like(prepare_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG")))


def test_sixteen_bit_grey_is_scaled():
    sixteen = (article().astype(np.uint16) * 257).astype(np.uint16)
    image = Image.fromarray(sixteen)
    assert image.mode.startswith("I;16")
    assert_fashion_mnist_like(prepare_image(encode(image, "PNG")))


def test_gif_uses_its_first_frame():
    first = Image.fromarray(article(), mode="L").convert("P")
    second = Image.new("P", first.size, 0)
    data = encode(first, "GIF", save_all=True, append_images=[second])
    assert_fashion_mnist_like(prepare_image(data))


def test_the_article_is_cropped_and_fitted_keeping_its_aspect():
    page = np.full((300, 300), 255, dtype=np.uint8)
    page[140:160, 50:250] = 0  # A 200x20 dark bar: aspect 10:1.
    array = prepare_image(encode(Image.fromarray(page, mode="L"), "PNG"))
    rows = np.flatnonzero(array.max(axis=1) > 0.5)
    cols = np.flatnonzero(array.max(axis=0) > 0.5)
    assert cols[0] <= 1 and cols[-1] >= 26, "the long side fills the frame"
    assert 2 <= len(rows) <= 4, "the short side keeps the aspect ratio"
    assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1.5, "centred"


def test_a_light_background_is_inverted_and_a_dark_one_is_not():
    dark_on_light = prepare_image(encode(Image.fromarray(article(), mode="L"), "PNG"))
    light_on_dark = prepare_image(encode(Image.fromarray(255 - article(), mode="L"), "PNG"))
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=0.02)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"this is not an image at all", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not an image|truncated or corrupt"),
    ],
)
def test_bad_bytes_get_clear_errors(data, message):
    with pytest.raises(ImageError, match=message):
        prepare_image(data)


def test_truncated_image_is_an_error():
    data = encode(Image.fromarray(article(), mode="L"), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        prepare_image(data[: len(data) // 2])


def test_decompression_bomb_is_rejected_without_decoding():
    bomb = encode(Image.new("1", (10_000, 5_000), 0), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="too large: 10000x5000 pixels|decompression bomb"):
        prepare_image(bomb)


def test_absurd_aspect_and_tiny_images_are_rejected():
    with pytest.raises(ImageError, match="absurd aspect ratio 2000x10"):
        prepare_image(encode(Image.new("L", (2000, 10), 255), "PNG"))
    with pytest.raises(ImageError, match="too small"):
        prepare_image(encode(Image.new("L", (2, 2), 255), "PNG"))


def test_oversize_input_is_rejected_before_decoding(tmp_path):
    data = b"\x00" * (preprocess.MAX_UPLOAD_BYTES + 1)
    with pytest.raises(ImageError, match="image too large"):
        prepare_image(data)
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="the limit is"):
        prepare_image(path)


def test_paths_that_are_not_readable_image_files_get_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="no such file"):
        prepare_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        prepare_image(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        prepare_image(fifo)
    shirt = tmp_path / "shirt.png"
    shirt.write_bytes(encode(Image.fromarray(article()), "PNG"))
    assert_fashion_mnist_like(prepare_image(str(shirt)))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ImageError, match="permission denied"):
        prepare_image(shirt)

    def fail(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "open", fail)
    with pytest.raises(ImageError, match=r"cannot be read \(Input/output error\)"):
        prepare_image(shirt)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read any file, so the permission cannot be taken away")
def test_an_unreadable_file_is_an_image_error(tmp_path):
    shirt = tmp_path / "shirt.png"
    shirt.write_bytes(encode(Image.fromarray(article()), "PNG"))
    shirt.chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        prepare_image(shirt)


# Formats Pillow can write but prepare_image must refuse (saving needs no external tool for any of them).
REFUSED_FORMATS = ["TIFF", "ICO", "TGA", "PPM", "JPEG2000", "EPS", "PCX", "SGI", "QOI", "DDS", "IM", "AVIF"]


@pytest.mark.parametrize("image_format", REFUSED_FORMATS)
def test_formats_outside_the_allow_list_are_refused(image_format):
    try:
        data = encode(Image.fromarray(article()).convert("RGB"), image_format)
    except (OSError, KeyError, ValueError) as error:
        pytest.skip(f"this Pillow cannot write {image_format}: {error}")
    assert Image.open(io.BytesIO(data)).format is not None, "Pillow itself would decode it"
    with pytest.raises(ImageError, match="not an accepted format: send a PNG, JPEG, WebP, BMP or GIF image"):
        prepare_image(data)


def test_eps_never_reaches_ghostscript(monkeypatch):
    calls = []

    def ghostscript(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript must not run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    data = encode(Image.new("RGB", (64, 64), "white"), "EPS")
    with pytest.raises(ImageError, match="not an accepted format"):
        prepare_image(data)
    assert calls == []


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def claiming(image_format: str, width: int, height: int) -> bytes:
    """A small valid file whose header is edited to claim ``width`` x ``height`` pixels (the data stays small)."""
    if image_format == "PNG16":
        header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
        data = zlib.compress(b"\x00" * (1 + 2 * 16) * 16)
        return (
            preprocess.PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
        )
    small = Image.fromarray(article(60, 80, 100)).convert("RGB")
    if image_format in ("JPEG", "PROGRESSIVE"):
        data = bytearray(encode(small, "JPEG", progressive=image_format == "PROGRESSIVE"))
        frame = data.find(b"\xff\xc2" if image_format == "PROGRESSIVE" else b"\xff\xc0")
        data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    elif image_format == "GIF":
        data = bytearray(encode(small, "GIF"))
        data[6:10] = struct.pack("<HH", width, height)
    elif image_format == "BMP":
        data = bytearray(encode(small, "BMP"))
        data[18:26] = struct.pack("<ii", width, height)
    else:
        frames = [small, small.rotate(90)]
        data = bytearray(encode(small, "WEBP", save_all=True, append_images=frames[1:], lossless=True))
        canvas = data.find(b"VP8X") + 12
        data[canvas : canvas + 6] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


HOSTILE_HEADERS = [
    ("PNG16", 6300, 6300),  # 40 M pixels of 16-bit grey in a 100-byte file.
    ("PROGRESSIVE", 6000, 6000),  # A progressive JPEG: its decoder holds every coefficient whatever the draft scale.
    ("JPEG", 10_000, 10_000),  # A baseline JPEG beyond what any phone camera produces.
    ("GIF", 65_535, 65_535),
    ("BMP", 30_000, 30_000),
    ("WEBP", 16_383, 16_383),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns, then we refuse.
@pytest.mark.parametrize(("image_format", "width", "height"), HOSTILE_HEADERS)
def test_sizes_are_refused_from_the_header(image_format, width, height):
    with pytest.raises(ImageError, match="too large"):
        prepare_image(claiming(image_format, width, height))


def test_eight_concurrent_hostile_decodes_stay_small(tmp_path):
    """8 threads per hostile file at once, in a fresh process: refused from the header, so memory stays flat."""
    paths = []
    for image_format, width, height in HOSTILE_HEADERS:
        paths.append(tmp_path / f"{image_format}.bin")
        paths[-1].write_bytes(claiming(image_format, width, height))
    code = (
        "import resource, sys, threading\n"
        "from fmnist.preprocess import ImageError, prepare_image\n"
        "blobs = [open(path, 'rb').read() for path in sys.argv[1:]]\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "outcomes = []\n"
        "def work(data):\n"
        "    try:\n"
        "        prepare_image(data)\n"
        "        outcomes.append('decoded')\n"
        "    except ImageError as error:\n"
        "        outcomes.append(str(error))\n"
        "threads = [threading.Thread(target=work, args=(data,)) for data in blobs for _ in range(8)]\n"
        "for thread in threads: thread.start()\n"
        "for thread in threads: thread.join()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
        "print('\\n'.join(outcomes))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb, *outcomes = done.stdout.strip().splitlines()
    assert len(outcomes) == 8 * len(HOSTILE_HEADERS) and all("too large" in outcome for outcome in outcomes), outcomes
    assert float(grown_mb) < 64, f"{grown_mb} MB for {len(outcomes)} refused decodes"


def test_a_phone_photo_is_decoded_at_an_eighth_of_its_size_and_a_progressive_one_is_budgeted_in_full():
    photo = Image.fromarray(article()).resize((4000, 3000)).convert("RGB")
    baseline = encode(photo, "JPEG", quality=80)
    image = preprocess.decode(baseline)
    assert image.size == (500, 375) and image.mode == "L"
    assert_fashion_mnist_like(prepare_image(baseline))
    assert preprocess.jpeg_layout(baseline).streamed
    progressive = encode(photo, "JPEG", quality=80, progressive=True)
    assert not preprocess.jpeg_layout(progressive).streamed
    with pytest.raises(ImageError, match="4000x3000 pixels \\(a progressive or multi-scan JPEG"):
        prepare_image(progressive)
    at_budget = encode(photo.resize((2048, 1536)), "JPEG", quality=80, progressive=True)
    assert_fashion_mnist_like(prepare_image(at_budget))


def test_a_jpeg_whose_first_scan_lacks_components_is_not_streamed():
    data = bytearray(encode(Image.fromarray(article()).convert("RGB"), "JPEG"))
    scan = data.find(b"\xff\xda")
    assert data[scan + 4] == 3
    data[scan + 4] = 1  # The first scan now claims one of the three components: libjpeg would buffer the image.
    assert not preprocess.jpeg_layout(bytes(data)).streamed


def test_an_mpo_from_a_phone_is_accepted_and_reduced():
    photo = Image.fromarray(article()).resize((2400, 2400)).convert("RGB")
    data = encode(photo, "MPO", save_all=True, append_images=[photo.rotate(90)])
    image = preprocess.decode(data)
    assert image.format == "MPO" and image.size == (300, 300)
    assert_fashion_mnist_like(prepare_image(data))


def test_the_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
    wide = Image.fromarray(article(100, 60, 120)).resize((200, 100)).convert("RGB")
    assert preprocess.decode(encode(wide, "JPEG", exif=exif.tobytes())).size == (100, 200)
    assert preprocess.decode(encode(wide, "JPEG")).size == (200, 100)


def gif_after_colour_table(data: bytes) -> int:
    flags = data[10]
    return 13 + ((3 << ((flags & 0x07) + 1)) if flags & 0x80 else 0)


def test_headers_pillow_would_walk_slowly_are_refused_before_it_sees_them():
    """Pillow reads these block by block in Python: seconds each at 10 MB, and hundreds of MB for GIF comments.

    Pillow alone accepts all but the stray bytes (which it rejects, slowly); real images have a few dozen blocks.
    """
    image = Image.fromarray(article()).convert("RGB")
    jpeg, png, gif = encode(image, "JPEG"), encode(image, "PNG"), encode(image, "GIF")
    at = gif_after_colour_table(gif)
    hostile = {
        "JPEG fill bytes": jpeg[:2] + b"\xff" * 2_000_000 + jpeg[2:],
        "JPEG stray bytes": jpeg[:2] + b"\xff\x00" * 1_000_000 + jpeg[2:],
        "JPEG empty comments": jpeg[:2] + b"\xff\xfe\x00\x02" * 500_000 + jpeg[2:],
        "PNG empty chunks": png[:33] + png_chunk(b"abCd", b"") * 200_000 + png[33:],
        "GIF comment blocks": gif[:at] + b"\x21\xfe\x01a\x00" * 200_000 + gif[at:],
    }
    for name, data in hostile.items():
        with pytest.raises(ImageError, match="chunks or 1,024 stray bytes"):
            prepare_image(data)
            pytest.fail(f"{name} was accepted")
    # A few stray bytes, as some encoders leave, are fine.
    assert_fashion_mnist_like(prepare_image(jpeg[:2] + b"\xff" * 100 + jpeg[2:]))


def test_a_png_with_thousands_of_data_chunks_is_accepted():
    png = encode(Image.fromarray(article()), "PNG")
    start = png.index(b"IDAT") - 4
    end = png.index(b"IEND") - 4
    compressed = png[start + 8 : end - 4]
    pieces = np.array_split(np.frombuffer(compressed, dtype=np.uint8), 3000)
    chunks = b"".join(png_chunk(b"IDAT", piece.tobytes()) for piece in pieces)
    assert_fashion_mnist_like(prepare_image(png[:start] + chunks + png[end:]))


# Every mode the accepted formats decode to, and those Pillow makes by conversion. Alpha modes and
# transparency keys have a black transparent background: only compositing onto white makes it background.
MODES = [
    "1",
    "L",
    "P",
    "PA",
    "LA",
    "La",
    "I",
    "I;16",
    "I;16L",
    "I;16B",
    "I;16N",
    "F",
    "RGB",
    "RGBA",
    "RGBX",
    "RGBa",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "L+transparency",
    "RGB+transparency",
    "P+transparency",
]
# The modes an accepted format can carry, and the format that round-trips each.
SAVED_AS = {
    "1": "BMP",
    "L": "PNG",
    "P": "GIF",
    "LA": "PNG",
    "I;16": "PNG",
    "RGB": "WEBP",
    "RGBA": "PNG",
    "CMYK": "JPEG",
    "L+transparency": "PNG",
    "RGB+transparency": "PNG",
    "P+transparency": "GIF",
}
ARTICLE_COLOUR, PAGE_COLOUR = (30, 40, 110), (245, 245, 240)


def image_in_mode(mode: str) -> Image.Image:
    """The article of ``article()`` (dark, centred on a light 160x160 page) in ``mode``."""
    grey = article(80, 110, 160)
    inside = grey < 128
    if mode == "1":
        return Image.fromarray(~inside)
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 257)
    if mode.startswith("I;16"):
        order = {"I;16": "<", "I;16L": "<", "I;16B": ">", "I;16N": "="}[mode]
        levels = (grey.astype(np.uint16) * 257).astype(f"{order}u2")
        return Image.frombytes(mode, (grey.shape[1], grey.shape[0]), levels.tobytes())
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255.0)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        colour = np.where(inside[..., np.newaxis], ARTICLE_COLOUR, 0)
        rgba = Image.fromarray(np.dstack([colour, np.where(inside, 255, 0)]).astype(np.uint8))
        if mode == "PA":
            image = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=8).convert("PA")
            image.putalpha(rgba.getchannel("A"))
            return image
        return rgba.convert("LA").convert("La") if mode == "La" else rgba.convert({"LA": "LA"}.get(mode, mode))
    if mode.endswith("+transparency"):
        colour = Image.fromarray(np.where(inside[..., np.newaxis], ARTICLE_COLOUR, 0).astype(np.uint8))
        base = mode.split("+")[0]
        image = colour.convert("L") if base == "L" else colour
        if base == "P":
            image = colour.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        image.info["transparency"] = {"L": 0, "RGB": (0, 0, 0), "P": image.getpixel((0, 0))}[base]
        return image
    colour = Image.fromarray(np.where(inside[..., np.newaxis], ARTICLE_COLOUR, PAGE_COLOUR).astype(np.uint8))
    if mode == "P":
        return colour.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return colour.convert(mode)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_becomes_grey_and_then_light_on_black(mode):
    image = image_in_mode(mode)
    assert image.mode == mode.split("+")[0]
    grey = to_grey(image)
    assert grey.dtype == np.float32 and grey.shape == (image.height, image.width)
    assert grey.min() >= 0.0 and grey.max() <= 255.0
    assert grey[80, 80] < 100, "the article stays dark"
    assert grey[5, 5] > 200, "the page, or the transparent background put on white, is light"
    assert_fashion_mnist_like(to_model_input(grey))
    if mode in SAVED_AS:
        options = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
        data = encode(image, SAVED_AS[mode], **options)
        reopened = Image.open(io.BytesIO(data))
        assert reopened.mode == image.mode and ("transparency" in reopened.info) == bool(options)
        assert_fashion_mnist_like(prepare_image(data))


def test_large_images_are_shrunk_before_conversion():
    big = Image.fromarray(article()).resize((2000, 2000)).convert("RGBA")
    grey = to_grey(big)
    assert grey.shape == (preprocess.WORKING_SIZE, preprocess.WORKING_SIZE)
    assert_fashion_mnist_like(to_model_input(grey))
    sixteen = to_grey(image_in_mode("I;16").resize((1000, 1000)))
    assert sixteen.shape == (preprocess.WORKING_SIZE, preprocess.WORKING_SIZE) and sixteen.max() > 200


def test_float_images_with_nan_or_infinity_stay_in_range():
    levels = np.asarray(image_in_mode("F"), dtype=np.float32).copy()
    levels[0, :10] = np.nan
    levels[1, :10] = np.inf
    grey = to_grey(Image.fromarray(levels))
    assert np.isfinite(grey).all() and grey.min() >= 0.0 and grey.max() <= 255.0


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused_before_decoding():
    """Each scan costs a pass over the whole image: 1,500 repeated scans took 11 s of CPU to decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (2048, 2048), (128, 128, 128)).save(buffer, "JPEG", progressive=True, quality=50)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda") : -2]
    bomb = data[:-2] + last_scan * 1500 + data[-2:]
    # This process's CPU time, not the wall clock: another test process may share the CPU (make test runs two).
    started = time.process_time()
    with pytest.raises(ImageError, match="1,5.. scans"):
        prepare_image(bomb)
    assert time.process_time() - started < 0.5
    assert prepare_image(data).shape == (28, 28)  # The same image with its own ten scans is fine.
