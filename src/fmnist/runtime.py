"""Process-wide set-up: quiet TensorFlow logs and one seed for every random source."""

from __future__ import annotations

import os
import random

import numpy as np


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ start-up chatter; must run before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def set_seed(seed: int, deterministic_ops: bool = True) -> None:
    """Seed Python, NumPy, TensorFlow and Keras from one number.

    With ``deterministic_ops`` TensorFlow also picks deterministic kernels, so a
    rerun on the same machine gives the same weights.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer.")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()
