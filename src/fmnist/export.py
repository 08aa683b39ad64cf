"""Export the trained Keras model to LiteRT: float32 and int8 (dynamic range), builtin ops only, logits out."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np

from fmnist.io import atomic_path
from fmnist.runtime import quiet_native_output, quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

# What a run records of how its LiteRT files were made: a kept run whose files came from another scheme is
# re-exported when its model is on disk (fmnist.experiments.refresh_export). Change it when the export changes.
EXPORT_SCHEME = "float32; int8 dynamic range (int8 weights per channel, activations quantised per image)"
# The name of the exported models' one output: the classifier's logits, before the softmax.
LOGITS = "logits"


def inference_graph(model: keras.Model) -> keras.Model:
    """The same layers and weights, rewired for export: Dropout dropped, Flatten as a constant reshape, and
    the final softmax Dense as a linear Dense with the same weights, whose logits are the output "logits".

    The model must be a plain stack of layers ending in a softmax Dense (the seed CNN and the bn_cnn family are).

    Keras lowers ``Flatten`` on a dynamic batch to SHAPE/STRIDED_SLICE/PACK ops, which split the graph
    that XNNPACK can delegate; a reshape to ``(-1, features)`` keeps the whole network in one delegate
    and still accepts any batch size. The outputs are identical.

    The runtime (:class:`fmnist.inference.Classifier`) applies the softmax in float32. An int8 model that
    ended in the softmax would quantise probabilities in steps of 1/256: the top class could never show
    more than 99.6% and every runner-up below 0.4% would read 0%.
    """
    stack = [layer for layer in model.layers if not isinstance(layer, layers.InputLayer | layers.Dropout)]
    last = stack[-1] if stack else None
    if not isinstance(last, layers.Dense) or getattr(last.activation, "__name__", None) != "softmax":
        raise ValueError(
            f"{model.name}: the last layer must be a Dense with a softmax activation, not {last!r}; "
            "export a classifier built by fmnist.model.build_network."
        )
    inputs = keras.Input(shape=model.input_shape[1:], name="image")
    outputs = inputs
    for layer in stack[:-1]:
        if isinstance(layer, layers.Flatten):
            outputs = keras.ops.reshape(outputs, (-1, int(np.prod(outputs.shape[1:]))))
        else:
            outputs = layer(outputs)
    logits_layer = layers.Dense(last.units, use_bias=last.use_bias, name=LOGITS)
    logits = logits_layer(outputs)
    logits_layer.set_weights(last.get_weights())
    # A dict output names the model's signature output, which is how the runtime tells logits from probabilities.
    return keras.Model(inputs, {LOGITS: logits}, name=f"{model.name}_inference")


def _converter(model) -> tf.lite.TFLiteConverter:
    converter = tf.lite.TFLiteConverter.from_keras_model(inference_graph(model))
    # Builtin ops only: no Flex (SELECT_TF_OPS), so the standalone ai-edge-litert runtime runs the model.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


def _convert(converter: tf.lite.TFLiteConverter) -> bytes:
    # The converter prints its settings on fd 2, and Keras prints the signature of the SavedModel it exports
    # first ("Saved artifact at ...") on stdout: neither says anything a reader of the notebook can act on.
    with quiet_native_output(), contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()


def to_float32(model) -> bytes:
    return _convert(_converter(model))


def to_int8(model) -> bytes:
    """int8 weights, with each layer's input quantised to int8 per image as the model runs ("dynamic range").

    The weights of every layer with at least 1,024 of them are stored as int8, one scale per output channel,
    and XNNPACK multiplies in int8 with an int32 accumulator. Unlike full-integer quantisation, no activation
    range is fixed beforehand from calibration images: each image's range is measured as it passes, so the
    first convolution (too few weights to be quantised) and the input stay float32, and no calibration set
    is needed. 05_deploy compares it with full-integer int8, float16 and float32 on the study's model.
    """
    converter = _converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return _convert(converter)


def to_float16(model) -> bytes:
    """float16 weights (half the size of float32); XNNPACK widens them and computes in float32."""
    converter = _converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    return _convert(converter)


def to_full_integer_int8(model, representative_images: np.ndarray) -> bytes:
    """Full-integer int8: every activation's range fixed beforehand from ``representative_images`` (training
    images), float32 in and out. Not shipped: 05_deploy compares it with :func:`to_int8`."""
    if len(representative_images) == 0:
        raise ValueError("representative_images is empty: give a few hundred training images.")

    def samples():
        for image in representative_images:
            yield [image[np.newaxis].astype(np.float32)]

    converter = _converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = samples
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
        # The converter calibrates from the representative dataset, yet warns that input statistics are missing.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return _convert(converter)


def quantisation_variants(
    model, representative_images: np.ndarray, exported: dict[str, Path], directory: Path
) -> dict[str, Path]:
    """The .tflite file of each scheme 05_deploy compares, by name: ``exported``'s float32 and int8 files (the
    stage's own exports, not converted again), and float16 and full-integer int8 written into ``directory``."""
    directory = Path(directory)
    return {
        "float32": Path(exported["float32"]),
        "float16 weights": write_model(to_float16(model), directory / "float16_weights.tflite"),
        "int8 full-integer": write_model(
            to_full_integer_int8(model, representative_images), directory / "int8_full_integer.tflite"
        ),
        "int8 dynamic range": Path(exported["int8"]),
    }


def operators(model_bytes: bytes) -> set[str]:
    """The operator names a LiteRT model uses (to prove it has no Flex ops)."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet_native_output():
        interpreter = Interpreter(model_content=model_bytes)
    return {op["op_name"] for op in interpreter._get_ops_details()}  # noqa: SLF001 - the only public-ish listing.


def write_model(model_bytes: bytes, path: Path) -> Path:
    """Write a .tflite file atomically, refusing one that needs Flex ops."""
    flex = sorted(name for name in operators(model_bytes) if "Flex" in name or name == "CUSTOM")
    if flex:
        raise ValueError(f"{path}: the converted model needs {flex}, which the standalone runtime lacks.")
    with atomic_path(path) as temporary:
        temporary.write_bytes(model_bytes)
    return path
