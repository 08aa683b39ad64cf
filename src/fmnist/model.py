"""The seed's convolutional network, built with Keras."""

from __future__ import annotations

from fmnist.config import IMAGE_SIZE, NUM_CLASSES
from fmnist.runtime import quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402
from keras import layers  # noqa: E402

# The seed's architecture has exactly this many trainable parameters.
SEED_PARAMETER_COUNT = 206_026


def build_model(dropout_rate: float = 0.5, learning_rate: float = 1e-3) -> keras.Model:
    """The seed's CNN: conv32-pool-conv64-pool-conv64-flatten-dense256-dropout-softmax.

    Compiled with Adam and sparse categorical cross-entropy, so it trains on the
    integer labels the data loader returns.
    """
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate}: must be in [0, 1).")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate={learning_rate}: must be positive.")
    model = keras.Sequential(
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
            layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities"),
        ],
        name="seed_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
