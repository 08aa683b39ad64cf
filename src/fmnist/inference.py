"""Classify images with a LiteRT model: the real-time path, without TensorFlow or Keras.

Needs only NumPy, Pillow (through :mod:`fmnist.preprocess`) and ``ai-edge-litert``.
The model shipped in ``fmnist/assets/`` is the default, so classification works
right after ``pip install .[serve]``, before anyone runs the study.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmnist.config import CLASS_NAMES, IMAGE_SIZE, PACKAGE_DIR
from fmnist.preprocess import prepare_image
from fmnist.runtime import quiet_native_output

DEFAULT_MODEL = PACKAGE_DIR / "assets" / "fmnist_int8.tflite"
# The signature output name of a model that outputs logits (fmnist.export.LOGITS); any other output is
# read as probabilities, as models exported before the logits output are.
LOGITS_OUTPUT = "logits"


class ModelError(ValueError):
    """The model file is missing or is not a LiteRT classifier of 28x28 images into 10 classes."""


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image, best first, how long the model took, and the 28x28 image it saw."""

    classes: list[tuple[str, float]]
    inference_ms: float
    # The model's input as uint8 grey levels (28, 28), light article on black; None when not recorded.
    model_input: np.ndarray | None = field(default=None, compare=False, repr=False)

    def as_dict(self, include_input: bool = False) -> dict[str, object]:
        """The JSON answer; ``include_input`` adds the 28x28 model input as base64 (784 bytes, row-major)."""
        answer: dict[str, object] = {
            "predictions": [{"class": name, "probability": round(p, 6)} for name, p in self.classes],
            "inference_ms": round(self.inference_ms, 4),
        }
        if include_input:
            if self.model_input is None:
                raise ValueError("this prediction has no model input; make it with Classifier.classify_array.")
            pixels = np.ascontiguousarray(self.model_input, dtype=np.uint8)
            if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"model_input has shape {pixels.shape}; expected ({IMAGE_SIZE}, {IMAGE_SIZE}).")
            answer["model_input"] = {
                "width": IMAGE_SIZE,
                "height": IMAGE_SIZE,
                "encoding": f"base64, {IMAGE_SIZE * IMAGE_SIZE} uint8 grey values, row-major",
                "data": base64.b64encode(pixels.tobytes()).decode("ascii"),
            }
        return answer


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for any logits."""
    logits = np.asarray(logits, dtype=np.float32)
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A prepared image in [0, 1] -> uint8 grey levels (28, 28), as the model saw it."""
    levels = np.rint(np.asarray(image, dtype=np.float32).reshape(IMAGE_SIZE, IMAGE_SIZE) * 255.0)
    return np.clip(levels, 0, 255).astype(np.uint8)


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:  # pragma: no cover - depends on the installation.
        raise ImportError("the LiteRT runtime is missing: pip install 'fmnist[serve]' (ai-edge-litert).") from error
    return Interpreter


class Classifier:
    """A LiteRT interpreter around one model file; thread-safe (one invocation at a time)."""

    def __init__(self, model_path: str | os.PathLike[str] | None = None, num_threads: int = 1):
        self.model_path = Path(model_path) if model_path else DEFAULT_MODEL
        if not self.model_path.is_file():
            raise ModelError(
                f"{self.model_path}: model file not found. Give --model PATH to a .tflite file "
                "(the study's 05_deploy stage writes them to OUT/deploy/)."
            )
        try:
            with quiet_native_output():  # LiteRT announces its XNNPACK delegate on fd 2.
                self.interpreter = _interpreter_class()(model_path=str(self.model_path), num_threads=num_threads)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ModelError(f"{self.model_path}: not a usable LiteRT model ({error}).") from error
        self._input = self.interpreter.get_input_details()[0]
        self._output, self.outputs_logits = self._find_output()
        image_shape, classes = tuple(self._input["shape"][1:3]), self._output["shape"][-1]
        if image_shape != (IMAGE_SIZE, IMAGE_SIZE) or classes != len(CLASS_NAMES):
            raise ModelError(
                f"{self.model_path}: input {self._input['shape']} / output {self._output['shape']} is not "
                f"a {IMAGE_SIZE}x{IMAGE_SIZE} image -> {len(CLASS_NAMES)} classes model."
            )
        self._lock = threading.Lock()
        self._batch = 1
        # Quantisation constants, looked up once: the per-call path stays a few NumPy operations.
        self._input_dtype = self._input["dtype"]
        self._input_scale, self._input_zero = self._input["quantization"]
        self._output_scale, self._output_zero = self._output["quantization"]
        if self.quantized:
            info = np.iinfo(self._input_dtype)
            self._input_range = (float(info.min), float(info.max))

    def _find_output(self) -> tuple[dict, bool]:
        """The output tensor's details, and whether it holds logits (named so in the model's signature)."""
        for signature in self.interpreter.get_signature_list():
            outputs = self.interpreter.get_signature_runner(signature).get_output_details()
            if LOGITS_OUTPUT in outputs:
                return outputs[LOGITS_OUTPUT], True
        return self.interpreter.get_output_details()[0], False

    @property
    def quantized(self) -> bool:
        return self._input_dtype != np.float32

    def _quantize(self, images: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return images
        scaled = images * (1.0 / self._input_scale) + self._input_zero
        return np.clip(np.rint(scaled, out=scaled), *self._input_range, out=scaled).astype(self._input_dtype)

    def _dequantize(self, outputs: np.ndarray) -> np.ndarray:
        if self._output["dtype"] == np.float32:
            return outputs
        return (outputs.astype(np.float32) - self._output_zero) * self._output_scale

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """float32 images (N, 28, 28) or (N, 28, 28, 1) in [0, 1] -> float32 probabilities (N, 10).

        A model that outputs logits gets its softmax here, in float32, so an int8 model's probabilities are
        not limited to steps of 1/256.
        """
        images = np.asarray(images, dtype=np.float32).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)
        with self._lock:
            if len(images) != self._batch:
                self.interpreter.resize_tensor_input(self._input["index"], [len(images), IMAGE_SIZE, IMAGE_SIZE, 1])
                self.interpreter.allocate_tensors()
                self._batch = len(images)
            self.interpreter.set_tensor(self._input["index"], self._quantize(images))
            self.interpreter.invoke()
            outputs = self._dequantize(self.interpreter.get_tensor(self._output["index"]))
        return softmax(outputs) if self.outputs_logits else outputs

    def classify_array(self, image: np.ndarray, top_k: int = 3) -> Prediction:
        """One prepared (28, 28) image in [0, 1] -> its top ``top_k`` classes, and the image as uint8."""
        if not 1 <= top_k <= len(CLASS_NAMES):
            raise ValueError(f"top_k={top_k}: must be between 1 and {len(CLASS_NAMES)}.")
        started = time.perf_counter()
        probabilities = self.probabilities(image[np.newaxis])[0]
        elapsed_ms = (time.perf_counter() - started) * 1000
        order = np.argsort(-probabilities)[:top_k]
        classes = [(CLASS_NAMES[i], float(probabilities[i])) for i in order]
        return Prediction(classes, elapsed_ms, model_input=to_uint8(image))

    def classify(self, source: bytes | str | os.PathLike[str], top_k: int = 3) -> Prediction:
        """Any image (bytes or path) -> its top classes; bad input raises ``ImageError``."""
        return self.classify_array(prepare_image(source), top_k=top_k)
