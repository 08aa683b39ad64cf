"""The per-layer rounding check: it rounds as dynamic-range int8 does, and reproduces the exported model."""

from __future__ import annotations

import numpy as np
import pytest

from fmnist import deploy, export, quantisation
from fmnist.model import build_network


def test_rounding_per_image_and_per_channel_keeps_256_levels_and_the_extremes():
    rng = np.random.default_rng(0)
    images = rng.random((3, 40, 40, 2)).astype(np.float32) * np.array([1.0, 10.0, 0.01])[:, None, None, None]
    rounded = quantisation.round_per_image(images)
    for image, original in zip(rounded, images, strict=True):
        step = original.max() / 255  # Non-negative values: the range is [0, max].
        assert np.abs(image - original).max() <= step / 2 + 1e-7
        assert len(np.unique(image)) <= 256
    assert quantisation.round_per_image(np.zeros((1, 4), dtype=np.float32)).tolist() == [[0, 0, 0, 0]]
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32) * np.array([1.0, 0.1, 5.0, 1e-3])
    rounded = quantisation.round_per_channel(kernel)
    np.testing.assert_allclose(np.abs(rounded).max(axis=(0, 1, 2)), np.abs(kernel).max(axis=(0, 1, 2)), rtol=1e-6)
    for channel in range(4):
        step = np.abs(kernel[..., channel]).max() / 127
        assert np.abs(rounded[..., channel] - kernel[..., channel]).max() <= step / 2 + 1e-7


def test_the_simulated_rounding_reproduces_the_exported_int8_model(tmp_path):
    model = build_network("bn_cnn", width=8, stages=(1, 1, 1), head="flatten")
    images = np.random.default_rng(1).random((200, 28, 28, 1), dtype=np.float32)
    plain = quantisation.probabilities_with_rounding(model, images, {})
    np.testing.assert_allclose(plain, model.predict(images, verbose=0), atol=1e-5)
    rows = {row["layer"]: row for row in quantisation.layer_sensitivity(model, images)}
    # The first convolution (72 weights) stays float32 in dynamic range; the others are quantised, and rounding
    # them in NumPy moves the probabilities as far as the exported int8 file does.
    assert not rows["stage1_conv1"]["quantised"] and rows["stage2_conv1"]["quantised"]
    assert rows["stage2_conv1"]["p99_both"] > 0 and rows["stage2_conv1"]["weights"] == 3 * 3 * 8 * 16
    path = export.write_model(export.to_int8(model), tmp_path / "int8.tflite")
    served = deploy.probability_agreement(path, images, plain)["p99"]
    simulated = rows["all quantised layers"]["p99_both"]
    assert simulated == pytest.approx(served, rel=0.02, abs=1e-6), (simulated, served)
    with pytest.raises(ValueError, match="name Conv2D or Dense layers"):
        quantisation.probabilities_with_rounding(model, images, {"stage1_pool": "both"})
    with pytest.raises(ValueError, match="images is empty"):
        quantisation.layer_sensitivity(model, images[:0])
    with pytest.raises(ValueError, match="'weights', 'inputs' or 'both'"):
        quantisation.probabilities_with_rounding(model, images, {"stage1_conv1": "all"})
