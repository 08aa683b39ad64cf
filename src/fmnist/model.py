"""The networks: the seed's CNN (the baseline) and a stronger, still CPU-sized family."""

from __future__ import annotations

from fmnist.config import IMAGE_SIZE, NUM_CLASSES
from fmnist.recipes import ARCHITECTURES, HEADS
from fmnist.runtime import quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402
from keras import layers  # noqa: E402

# The seed's architecture has exactly this many trainable parameters.
SEED_PARAMETER_COUNT = 206_026


def _check_rates(dropout_rate: float) -> None:
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate}: must be in [0, 1).")


def seed_network(dropout_rate: float = 0.5) -> keras.Model:
    """The seed's CNN, uncompiled: conv32-pool-conv64-pool-conv64-flatten-dense256-dropout-softmax."""
    _check_rates(dropout_rate)
    return keras.Sequential(
        [
            keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), name="image"),
            layers.Conv2D(32, (3, 3), activation="relu", name="conv1"),
            layers.MaxPooling2D((2, 2), name="pool1"),
            layers.Conv2D(64, (3, 3), activation="relu", name="conv2"),
            layers.MaxPooling2D((2, 2), name="pool2"),
            layers.Conv2D(64, (3, 3), activation="relu", name="conv3"),
            layers.Flatten(name="flatten"),
            layers.Dense(256, activation="relu", name="dense"),
            layers.Dropout(dropout_rate, name="dropout"),
            # float32 whatever the global policy: a bf16 softmax would round the probabilities.
            layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities"),
        ],
        name="seed_cnn",
    )


def bn_cnn_network(
    dropout_rate: float = 0.3,
    width: int = 32,
    stages: tuple[int, ...] = (1, 1, 2),
    batch_norm: bool = True,
    head: str = "gap",
    separable_stages: tuple[int, ...] = (),
) -> keras.Model:
    """A compact VGG-style CNN sized for a CPU.

    ``len(stages)`` resolutions (28, 14, 7 pixels), each with ``stages[i]`` 3x3
    "same" convolutions of ``width * 2**i`` filters, every one followed by batch
    normalisation (when ``batch_norm``) and ReLU; max pooling between the
    resolutions, then the head, dropout and the softmax. The "gap" head (global
    average pooling) keeps the parameter count small; the "flatten" head feeds
    every position of the last feature map to the softmax, as the seed's
    network does, without the seed's large hidden dense layer.

    The first convolution of each stage in ``separable_stages`` is depthwise-separable (a 3x3 filter per
    input channel, then a 1x1 convolution across them). Small enough (under 1,024 weights in each part), it
    stays in float32 in the dynamic-range int8 export, so its input is not rounded.
    """
    _check_rates(dropout_rate)
    if width < 1 or not stages or min(stages) < 1:
        raise ValueError(f"width={width}, stages={stages}: need a positive width and at least one conv per stage.")
    inputs = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
    features = inputs
    for stage, convolutions in enumerate(stages, start=1):
        filters = width * 2 ** (stage - 1)
        for index in range(1, convolutions + 1):
            name = f"stage{stage}_conv{index}"
            convolution = layers.SeparableConv2D if index == 1 and stage in separable_stages else layers.Conv2D
            features = convolution(filters, 3, padding="same", use_bias=not batch_norm, name=name)(features)
            if batch_norm:
                # Momentum 0.9, not Keras' 0.99: the moving statistics used at inference must settle
                # within the few hundred steps of a short run or a search trial.
                features = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(features)
            features = layers.ReLU(name=f"{name}_relu")(features)
        if stage < len(stages):
            features = layers.MaxPooling2D(name=f"stage{stage}_pool")(features)
    if head == "gap":
        features = layers.GlobalAveragePooling2D(name="global_pool")(features)
    elif head == "flatten":
        features = layers.Flatten(name="flatten")(features)
    else:
        raise ValueError(f"head={head!r}: choose one of {', '.join(HEADS)}.")
    features = layers.Dropout(dropout_rate, name="dropout")(features)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(features)
    return keras.Model(inputs, outputs, name="bn_cnn")


def build_network(architecture: str = "seed", *, dropout_rate: float = 0.5, **options) -> keras.Model:
    """One of ``ARCHITECTURES``, uncompiled; ``options`` go to the bn_cnn family (width, stages, batch_norm, head,
    separable_stages: ``Recipe`` checks them)."""
    if architecture == "seed":
        if options:
            raise ValueError(f"the seed architecture is fixed; it takes no {sorted(options)}.")
        return seed_network(dropout_rate)
    if architecture == "bn_cnn":
        return bn_cnn_network(dropout_rate, **options)
    raise ValueError(f"architecture={architecture!r}: choose one of {', '.join(ARCHITECTURES)}.")


def float32_copy(model: keras.Model) -> keras.Model:
    """The same network and weights computing in float32 (a mixed-precision model trains in bfloat16)."""

    def in_float32(layer):
        config = layer.get_config()
        config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=in_float32)
    copy.set_weights(model.get_weights())
    if getattr(model, "optimizer", None) is not None:
        # Compiled the same way, so evaluate() reports the same loss and metrics.
        copy.compile(optimizer=model.optimizer.__class__(), loss=model.loss, metrics=["accuracy"])
        # Built, so a saved copy loads without a warning about missing optimizer variables.
        copy.optimizer.build(copy.trainable_variables)
    return copy


def multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one forward pass through the Conv2D, SeparableConv2D and Dense layers (the model's cost)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.SeparableConv2D):
            kernel_h, kernel_w, channels_in, _ = layer.depthwise_kernel.shape
            _, height, width, channels_out = layer.output.shape
            total += height * width * channels_in * (kernel_h * kernel_w + channels_out)
        elif isinstance(layer, layers.Conv2D):
            kernel_h, kernel_w, channels_in, channels_out = layer.kernel.shape
            _, height, width, _ = layer.output.shape
            total += height * width * channels_out * kernel_h * kernel_w * channels_in
        elif isinstance(layer, layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)
