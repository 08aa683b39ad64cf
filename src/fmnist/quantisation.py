"""Where int8 rounding costs a model its fidelity: each layer's rounding simulated alone, in float32.

``fmnist.export.to_int8`` writes dynamic-range int8: every Conv2D or Dense with at least
``DYNAMIC_MIN_WEIGHTS`` weights stores them as int8 (one symmetric scale per output channel), and its input
is quantised per image (one asymmetric scale over the whole image) as the model runs. This module rounds
the same way in NumPy, one layer at a time, and measures how far the model's probabilities move: the part
of the served int8 model's error that each layer's weights and inputs make.
"""

from __future__ import annotations

import numpy as np

from fmnist.runtime import quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402
from keras import layers  # noqa: E402

# The TFLite converter leaves tensors with fewer weights than this in float32 under dynamic-range quantisation.
DYNAMIC_MIN_WEIGHTS = 1024


def round_per_image(values: np.ndarray) -> np.ndarray:
    """Round each image's values (first axis) to 256 levels spanning its own range and 0, as XNNPACK does."""
    flat = values.reshape(len(values), -1)
    low = np.minimum(flat.min(axis=1, keepdims=True), 0.0)
    high = np.maximum(flat.max(axis=1, keepdims=True), 0.0)
    scale = (high - low) / 255.0
    scale[scale == 0] = 1.0
    zero_point = np.round(-128 - low / scale)
    levels = np.clip(np.round(flat / scale) + zero_point, -128, 127)
    return ((levels - zero_point) * scale).reshape(values.shape).astype(np.float32)


def round_per_channel(kernel: np.ndarray) -> np.ndarray:
    """Round a kernel to int8 with one symmetric scale per output channel (its last axis)."""
    axes = tuple(range(kernel.ndim - 1))
    scale = np.abs(kernel).max(axis=axes, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return (np.clip(np.round(kernel / scale), -127, 127) * scale).astype(np.float32)


def _weighted(model: keras.Model) -> list[layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, layers.Conv2D | layers.Dense)]


def probabilities_with_rounding(
    model: keras.Model, images: np.ndarray, rounded: dict[str, str], batch: int = 1000
) -> np.ndarray:
    """The model's probabilities with the named layers rounded: layer name -> "weights", "inputs" or "both".

    The model must be a chain of layers (the seed CNN and the bn_cnn family are). Batch normalisation is
    applied as a separate layer; per-channel rounding of the kernel before it equals rounding the kernel
    that the converter folds it into, since folding scales each output channel by one factor.
    """
    unknown = set(rounded) - {layer.name for layer in _weighted(model)}
    if unknown or not set(rounded.values()) <= {"weights", "inputs", "both"}:
        raise ValueError(
            f"rounded={rounded!r}: name Conv2D or Dense layers of {model.name} "
            f"({', '.join(layer.name for layer in _weighted(model))}) with 'weights', 'inputs' or 'both'."
        )
    chain = [layer for layer in model.layers if not isinstance(layer, layers.InputLayer)]
    outputs = []
    for start in range(0, len(images), batch):
        values = np.asarray(images[start : start + batch], dtype=np.float32)
        for layer in chain:
            what = rounded.get(layer.name)
            if what in ("inputs", "both"):
                values = round_per_image(values)
            if what in ("weights", "both"):
                kernel, *rest = layer.get_weights()
                layer.set_weights([round_per_channel(kernel), *rest])
                try:
                    values = np.asarray(layer(values, training=False))
                finally:
                    layer.set_weights([kernel, *rest])
            else:
                values = np.asarray(layer(values, training=False))
        outputs.append(values)
    return np.concatenate(outputs).astype(np.float32)


def layer_sensitivity(model: keras.Model, images: np.ndarray) -> list[dict[str, object]]:
    """For each Conv2D and Dense layer: its weight count, whether dynamic-range int8 quantises it, and the
    99th percentile over ``images`` of the largest per-class probability difference that rounding its
    weights alone, its inputs alone, or both, makes. A last row rounds every layer that dynamic range
    quantises, which should match the exported int8 model's own figure."""
    from fmnist.deploy import probability_difference

    if len(images) == 0:
        raise ValueError("images is empty: give some test images (sensitivity_images >= 1).")
    reference = probabilities_with_rounding(model, images, {})
    # Layer by layer is the model only for a chain of layers: a branching model would give other numbers.
    if not np.allclose(reference, model.predict(images, batch_size=1000, verbose=0), atol=1e-4):
        raise ValueError(f"{model.name} is not a chain of layers; the per-layer rounding check cannot follow it.")
    rows = []
    for layer in _weighted(model):
        weights = int(np.prod(layer.get_weights()[0].shape))
        row = {"layer": layer.name, "weights": weights, "quantised": weights >= DYNAMIC_MIN_WEIGHTS}
        for what in ("weights", "inputs", "both"):
            moved = probabilities_with_rounding(model, images, {layer.name: what})
            row[f"p99_{what}"] = probability_difference(moved, reference)["p99"]
        rows.append(row)
    dynamic = {row["layer"]: "both" for row in rows if row["quantised"]}
    together = probability_difference(probabilities_with_rounding(model, images, dynamic), reference)["p99"]
    rows.append(
        {
            "layer": "all quantised layers",
            "weights": sum(row["weights"] for row in rows if row["quantised"]),
            "quantised": True,
            "p99_weights": None,
            "p99_inputs": None,
            "p99_both": together,
        }
    )
    return rows
