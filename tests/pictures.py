"""Pictures the tests upload: real Fashion-MNIST articles, shown the way a person would photograph them."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

# The test set's first pair of trousers (test image 2), as its 28x28 bytes: the tests that upload it need not
# load the dataset. test_data checks that it still is that image.
TEST_TROUSER = Path(__file__).parent / "images" / "test_trouser_28.png"
TEST_TROUSER_INDEX = 2


def trouser_article() -> np.ndarray:
    """The 28x28 uint8 article, light on black as the dataset stores it."""
    return np.asarray(Image.open(TEST_TROUSER).convert("L"))


@functools.cache
def trouser() -> np.ndarray:
    """The test set's first pair of trousers, dark on white paper: 4x larger, off-centre on a 200x160 page.

    A real article rather than a drawing: whichever model the shipping rule installs, the tests ask it
    about an image of the kind it was trained and judged on. Trousers are the class every model here
    gets right (recall 0.99 and above), and the upload path still has to invert it, find it on the
    page, crop and shrink it.
    """
    enlarged = Image.fromarray(255 - trouser_article()).resize((112, 112), Image.Resampling.BICUBIC)
    page = Image.new("L", (160, 200), 255)
    page.paste(enlarged, (8, 70))
    picture = np.asarray(page)
    picture.setflags(write=False)
    return picture
