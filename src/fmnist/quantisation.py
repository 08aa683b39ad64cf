"""Dynamic-range int8 rounding, simulated in float32: where it costs a model its fidelity, and training
through it so that it costs less.

``fmnist.export.to_int8`` writes dynamic-range int8: every Conv2D or Dense with at least
``DYNAMIC_MIN_WEIGHTS`` weights stores them as int8 (one symmetric scale per output channel), and its input
is quantised per image (one asymmetric scale over the whole image) as the model runs. This module rounds
the same way (``keras.ops``, with gradients passing straight through), one layer at a time to measure how
far each layer's weights and inputs move the model's probabilities (:func:`layer_sensitivity`), or all
together while fine-tuning the model to serve in int8 what it computes in float (:func:`fine_tune`).
"""

from __future__ import annotations

import numpy as np

from fmnist.runtime import quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

# The TFLite converter leaves tensors with fewer weights than this in float32 under dynamic-range quantisation.
DYNAMIC_MIN_WEIGHTS = 1024


def fake_quantise_per_image(values):
    """Round each image's values (first axis) to 256 levels spanning its own range and 0, as XNNPACK does.

    Works on tensors inside a training step: the forward pass is rounded, and the gradient passes through
    as if it were not (the straight-through estimator).
    """
    axes = tuple(range(1, len(values.shape)))
    low = ops.minimum(ops.min(values, axis=axes, keepdims=True), 0.0)
    high = ops.maximum(ops.max(values, axis=axes, keepdims=True), 0.0)
    scale = (high - low) / 255.0
    scale = ops.where(scale == 0, ops.ones_like(scale), scale)
    zero_point = ops.round(-128.0 - low / scale)
    levels = ops.clip(ops.round(values / scale) + zero_point, -128.0, 127.0)
    return values + ops.stop_gradient((levels - zero_point) * scale - values)


def fake_quantise_per_channel(kernel):
    """Round a kernel to int8 with one symmetric scale per output channel (its last axis), as the converter
    does; the gradient passes straight through, as in :func:`fake_quantise_per_image`."""
    axes = tuple(range(len(kernel.shape) - 1))
    scale = ops.max(ops.abs(kernel), axis=axes, keepdims=True) / 127.0
    scale = ops.where(scale == 0, ops.ones_like(scale), scale)
    return kernel + ops.stop_gradient(ops.clip(ops.round(kernel / scale), -127.0, 127.0) * scale - kernel)


def round_per_image(values: np.ndarray) -> np.ndarray:
    """:func:`fake_quantise_per_image` on a NumPy array."""
    return np.asarray(fake_quantise_per_image(ops.convert_to_tensor(values, dtype="float32")))


def round_per_channel(kernel: np.ndarray) -> np.ndarray:
    """:func:`fake_quantise_per_channel` on a NumPy array."""
    return np.asarray(fake_quantise_per_channel(ops.convert_to_tensor(kernel, dtype="float32")))


def _weighted(model: keras.Model) -> list[layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, layers.Conv2D | layers.Dense)]


def quantised_layers(model: keras.Model) -> list[str]:
    """The Conv2D and Dense layers whose weights dynamic-range int8 stores as int8 (and whose inputs it rounds).

    A SeparableConv2D runs in float32 (as any other layer here) only while both of its kernels stay under
    ``DYNAMIC_MIN_WEIGHTS``; a larger one is refused, since its rounding inside the layer is not simulated.
    """
    for layer in model.layers:
        if (
            isinstance(layer, layers.SeparableConv2D)
            and max(int(np.prod(layer.depthwise_kernel.shape)), int(np.prod(layer.pointwise_kernel.shape)))
            >= DYNAMIC_MIN_WEIGHTS
        ):
            raise ValueError(
                f"{model.name}: the separable convolution {layer.name} has a kernel of {DYNAMIC_MIN_WEIGHTS:,} "
                "weights or more, which int8 would quantise inside the layer, and that is not simulated here: "
                "make it separable only where its input and output channels multiply to fewer than "
                f"{DYNAMIC_MIN_WEIGHTS:,} (a narrower stage), or use a plain convolution there."
            )
    return [layer.name for layer in _weighted(model) if int(np.prod(layer.kernel.shape)) >= DYNAMIC_MIN_WEIGHTS]


def require_quantised_layers(model: keras.Model, what: str) -> list[str]:
    """:func:`quantised_layers`, refusing a model that has none (``what`` names it in the message)."""
    quantised = quantised_layers(model)
    if not quantised:
        raise ValueError(
            f"{what}: the network has no layer that dynamic-range int8 quantises (none with "
            f"{DYNAMIC_MIN_WEIGHTS:,} weights or more), so there is nothing to fine-tune for int8: set the "
            "recipe's quantisation_aware_epochs to 0."
        )
    return quantised


def logits_with_rounding(model: keras.Model, images, rounded: dict[str, str]):
    """The model's logits with the named layers rounded: layer name -> "weights", "inputs" or "both".

    The model must be a chain of layers ending in a softmax Dense (the seed CNN and the bn_cnn family are).
    Dropout is left out, as at inference. Batch normalisation runs as its own layer, in inference mode;
    per-channel rounding of the kernel before it equals rounding the kernel that the converter folds it
    into, since folding scales each output channel by one factor. Differentiable: the rounding passes
    gradients straight through (:func:`fine_tune` trains through it).
    """
    weighted = _weighted(model)
    unknown = set(rounded) - {layer.name for layer in weighted}
    if unknown or not set(rounded.values()) <= {"weights", "inputs", "both"}:
        raise ValueError(
            f"rounded={rounded!r}: name Conv2D or Dense layers of {model.name} "
            f"({', '.join(layer.name for layer in weighted)}) with 'weights', 'inputs' or 'both'."
        )
    chain = [layer for layer in model.layers if not isinstance(layer, layers.InputLayer | layers.Dropout)]
    last = chain[-1]
    if not isinstance(last, layers.Dense) or getattr(last.activation, "__name__", None) != "softmax":
        raise ValueError(f"{model.name}: the last layer must be a Dense with a softmax activation, not {last!r}.")
    values = images
    for layer in chain:
        what = rounded.get(layer.name)
        if what in ("inputs", "both"):
            values = fake_quantise_per_image(values)
        if not isinstance(layer, layers.Conv2D | layers.Dense):
            values = layer(values, training=False)
            continue
        kernel = fake_quantise_per_channel(layer.kernel) if what in ("weights", "both") else layer.kernel
        values = (
            layer.convolution_op(values, kernel) if isinstance(layer, layers.Conv2D) else ops.matmul(values, kernel)
        )
        if layer.use_bias:
            values = values + layer.bias
        if layer is not last:
            values = layer.activation(values)
    return values


def probabilities_with_rounding(
    model: keras.Model, images: np.ndarray, rounded: dict[str, str], batch: int = 1000
) -> np.ndarray:
    """The model's probabilities with the named layers rounded (see :func:`logits_with_rounding`)."""
    outputs = [
        np.asarray(
            ops.softmax(logits_with_rounding(model, np.asarray(images[start : start + batch], np.float32), rounded))
        )
        for start in range(0, len(images), batch)
    ]
    if not outputs:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
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
    quantised = quantised_layers(model)
    rows = []
    for layer in _weighted(model):
        weights = int(np.prod(layer.get_weights()[0].shape))
        row = {"layer": layer.name, "weights": weights, "quantised": layer.name in quantised}
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


def equalise_channels(model: keras.Model, images: np.ndarray, percentile: float = 99.99) -> list[str]:
    """Rescale each convolution's output channels so that all reach the same range, without changing what the
    float model computes; returns the layers whose inputs were equalised.

    Dynamic-range int8 rounds a layer's input with one scale per image, set by its largest value: a channel
    whose values stay small gets few of the 256 levels. Where a batch normalisation is followed only by ReLU
    and max pooling (which commute with a positive scale per channel) before the next convolution, its
    output channel c is multiplied by s_c (its gamma and beta) and the next convolution's input channel c
    divided by s_c. s_c brings the channel's ``percentile`` over ``images`` up to the largest channel's.
    """
    chain = [layer for layer in model.layers if not isinstance(layer, layers.InputLayer | layers.Dropout)]
    equalised = []
    for position, layer in enumerate(chain):
        if not isinstance(layer, layers.BatchNormalization):
            continue
        between = []
        for following in chain[position + 1 :]:
            if _plain_relu(following) or isinstance(following, layers.MaxPooling2D):
                between.append(following)
                continue
            break
        else:
            continue
        # Only a plain ReLU and max pooling commute with a positive scale, and the ReLU makes the values >= 0.
        if not isinstance(following, layers.Conv2D) or not any(_plain_relu(layer) for layer in between):
            continue
        outputs = keras.Model(model.inputs, between[-1].output).predict(images, batch_size=1000, verbose=0)
        ranges = np.percentile(outputs.reshape(-1, outputs.shape[-1]), percentile, axis=0)
        if ranges.max() <= 0:
            continue  # Every channel is silent on these images: nothing to equalise.
        scale = ranges.max() / np.maximum(ranges, 1e-3 * ranges.max())
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights([gamma * scale, beta * scale, mean, variance])
        kernel, *rest = following.get_weights()
        following.set_weights([kernel / scale[np.newaxis, np.newaxis, :, np.newaxis], *rest])
        equalised.append(following.name)
    return equalised


def _plain_relu(layer: layers.Layer) -> bool:
    return (
        isinstance(layer, layers.ReLU)
        and layer.max_value is None
        and not float(layer.threshold)
        and not float(layer.negative_slope)
    )


def snap_weights(model: keras.Model) -> None:
    """Put every quantised layer's kernel on its int8 grid, so the int8 export stores exactly these weights."""
    for name in quantised_layers(model):
        layer = model.get_layer(name)
        layer.kernel.assign(round_per_channel(np.asarray(layer.kernel)))


def fine_tune(
    model: keras.Model,
    batches,
    *,
    steps_per_epoch: int,
    epochs: int,
    learning_rate: float,
    consistency_weight: float,
    say=print,
) -> dict[str, list[float]]:
    """Quantisation-aware fine-tuning: teach a trained float model to serve the same probabilities in int8.

    Each step runs the model twice on the batch: with its quantised layers' weights rounded to int8 (the
    float model), and with their inputs rounded per image as well (the model as dynamic-range int8 serves
    it). The loss is the usual cross-entropy of the first against ``batches``' target rows (labels or a
    teacher's probabilities), plus ``consistency_weight`` times the KL divergence of the second from the
    first. Gradients pass straight through the rounding. The learning rate decays from ``learning_rate`` to
    0 along a cosine. Batch normalisation stays in inference mode (its statistics fixed, so the converter
    folds it exactly); the Conv2D and Dense kernels and biases and batch normalisation's gamma and beta train,
    so the network can also rescale its channels. A SeparableConv2D (float32 in the int8 file: nothing of it
    is rounded) keeps its weights. At the end every quantised kernel is snapped to its
    int8 grid, so the export rounds nothing more in the weights: what differs between the float model and
    its int8 file is only the inputs' rounding, which the second term trained the model to shrug off.

    ``batches`` yields (images, target rows) for ``epochs`` x ``steps_per_epoch`` steps. Returns the
    per-epoch history: ``loss`` (cross-entropy), ``consistency`` (the KL term, unweighted) and
    ``epoch_seconds``.
    """
    import time

    import tensorflow as tf

    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"epochs={epochs}, steps_per_epoch={steps_per_epoch}: both must be at least 1.")
    quantised = require_quantised_layers(model, model.name)
    float_model = dict.fromkeys(quantised, "weights")
    served = dict.fromkeys(quantised, "both")
    weighted = _weighted(model)
    normalisations = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    variables = (
        [layer.kernel for layer in weighted]
        + [layer.bias for layer in weighted if layer.use_bias]
        + [variable for layer in normalisations for variable in (layer.gamma, layer.beta) if variable is not None]
    )
    # A cosine decay to 0, so the last steps barely move the weights that are then snapped to the grid.
    optimizer = keras.optimizers.Adam(
        learning_rate=keras.optimizers.schedules.CosineDecay(learning_rate, epochs * steps_per_epoch)
    )

    @tf.function
    def step(images, targets):
        with tf.GradientTape() as tape:
            logits = logits_with_rounding(model, images, float_model)
            rounded_logits = logits_with_rounding(model, images, served)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, logits))
            log_probabilities = tf.nn.log_softmax(logits)
            consistency = tf.reduce_mean(
                tf.reduce_sum(
                    tf.exp(log_probabilities) * (log_probabilities - tf.nn.log_softmax(rounded_logits)), axis=1
                )
            )
            total = loss + consistency_weight * consistency
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables, strict=True))
        return loss, consistency

    history: dict[str, list[float]] = {"loss": [], "consistency": [], "epoch_seconds": []}
    iterator = iter(batches)
    for epoch in range(epochs):
        started = time.perf_counter()
        losses, consistencies = [], []
        for _ in range(steps_per_epoch):
            images, targets = next(iterator)
            loss, consistency = step(images, targets)
            losses.append(float(loss))
            consistencies.append(float(consistency))
        history["loss"].append(float(np.mean(losses)))
        history["consistency"].append(float(np.mean(consistencies)))
        history["epoch_seconds"].append(round(time.perf_counter() - started, 2))
        say(
            f"quantisation-aware epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.4f}, "
            f"consistency {history['consistency'][-1]:.2e} ({history['epoch_seconds'][-1]:.0f} s)"
        )
    snap_weights(model)
    return history


def fine_tuning_code_version() -> str:
    """A digest of the code that decides what quantisation-aware fine-tuning computes: a run records it, and
    the report names runs that an earlier version fine-tuned (kept while their recipe is unchanged)."""
    from fmnist import experiments
    from fmnist.training import code_digest

    return code_digest(
        [
            fake_quantise_per_image,
            fake_quantise_per_channel,
            quantised_layers,
            require_quantised_layers,
            logits_with_rounding,
            equalise_channels,
            _plain_relu,
            snap_weights,
            fine_tune,
            experiments.quantisation_aware_fine_tune,
        ]
    )
