"""One preprocessing function for the CLI, the API and the page: real images in, Fashion-MNIST-like arrays out."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fmnist import preprocess
from fmnist.preprocess import ImageError, prepare_image


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
    with pytest.raises(ImageError, match="no such file"):
        prepare_image(tmp_path / "missing.png")
