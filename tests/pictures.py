"""Pictures the tests upload: real Fashion-MNIST articles, shown the way a person would photograph them."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from fmnist import data
from fmnist.config import CLASS_NAMES


@functools.cache
def trouser() -> np.ndarray:
    """The test set's first pair of trousers, dark on white paper: 4x larger, off-centre on a 200x160 page.

    A real article rather than a drawing: whichever model the shipping rule installs, the tests ask it
    about an image of the kind it was trained and judged on. Trousers are the class every model here
    gets right (recall 0.99 and above), and the upload path still has to invert it, find it on the
    page, crop and shrink it.
    """
    dataset = data.load_fashion_mnist()
    index = int(np.flatnonzero(dataset.y_test == CLASS_NAMES.index("Trouser"))[0])
    article = (dataset.x_test[index, :, :, 0] * 255).round().astype(np.uint8)
    enlarged = Image.fromarray(255 - article).resize((112, 112), Image.Resampling.BICUBIC)
    page = Image.new("L", (160, 200), 255)
    page.paste(enlarged, (8, 70))
    picture = np.asarray(page)
    picture.setflags(write=False)
    return picture
