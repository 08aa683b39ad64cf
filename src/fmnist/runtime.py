"""Process-wide set-up: quiet TensorFlow logs and one seed for every random source."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import tempfile
import threading
from collections.abc import Iterator

import numpy as np

# Set to "show" to leave native libraries' direct writes to file descriptor 2 alone (see ``quiet_native_output``).
# ``fmnist run`` sets it: its kernels do not forward that descriptor to the notebook, and it points at the stage's log.
NATIVE_OUTPUT_ENV = "FMNIST_NATIVE_OUTPUT"

_NATIVE_OUTPUT_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Keep what native code writes straight to file descriptor 2 out of notebooks and terminals.

    TensorFlow's C++ start-up messages are written before absl's logging is initialised, so
    ``TF_CPP_MIN_LOG_LEVEL`` cannot hold them back; LiteRT announces its XNNPACK delegate and the
    converter prints its settings the same way, and a Jupyter kernel shows all of it as stderr output.
    Inside this block descriptor 2 goes to a temporary file, which is dropped when the block ends
    normally and replayed on stderr when it raises, so a failure keeps its explanation. With
    ``FMNIST_NATIVE_OUTPUT=show`` nothing is redirected: ``fmnist run`` sets that, because there the
    kernels' descriptor 2 already is the stage's log, and it is the way to see everything when
    debugging (a process that native code aborts inside this block loses its message otherwise).
    """
    if os.environ.get(NATIVE_OUTPUT_ENV) == "show":
        yield
        return
    with _NATIVE_OUTPUT_LOCK, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            if text.strip():
                sys.stderr.write(text)
                sys.stderr.flush()
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def quiet_tensorflow() -> None:
    """Import TensorFlow without its start-up chatter (see ``quiet_native_output``); call it before importing it.

    The CUDA probe, which logs its failure on a machine without a GPU at first use, runs here too.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    with quiet_native_output():
        import tensorflow as tf

        tf.config.list_physical_devices()
    # TensorFlow's Python logger announces every SavedModel it writes ("Assets written to ...") at INFO.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


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
