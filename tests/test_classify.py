"""The real-time path: shipped model, CLI, no TensorFlow, and the export it comes from."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fmnist.cli import main
from fmnist.inference import DEFAULT_MODEL, Classifier, ModelError, Prediction

from pictures import trouser


@pytest.fixture
def images(tmp_path):
    good = tmp_path / "trousers.jpg"
    Image.fromarray(trouser()).convert("RGB").save(good)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    return good, bad


def test_the_shipped_model_is_small_and_accurate_on_test_images():
    from fmnist import data

    assert DEFAULT_MODEL.is_file() and DEFAULT_MODEL.stat().st_size <= 256 * 1024  # The shipping rule's size limit.
    dataset = data.load_fashion_mnist()
    classifier = Classifier()
    assert classifier.outputs_logits
    # Dynamic-range int8: int8 weights, a float32 input, and no QUANTIZE step (full-integer int8 has one).
    assert any(tensor["dtype"] == np.int8 for tensor in classifier.interpreter.get_tensor_details())
    operators = {op["op_name"] for op in classifier.interpreter._get_ops_details()}
    assert not classifier.quantized and "QUANTIZE" not in operators
    probabilities = classifier.probabilities(dataset.x_test[:1000])
    assert (probabilities.argmax(axis=1) == dataset.y_test[:1000]).mean() > 0.85
    # Not the steps of 1/256 of an int8 softmax: confident answers pass 99.6%, runner-ups are not 0.
    ranked = np.sort(probabilities, axis=1)
    assert ranked[:, -1].max() > 0.999 and (ranked[:, -2] > 0).all()


def test_classify_prints_top_classes_and_fails_per_bad_file(images, capsys):
    good, bad = images
    assert main(["classify", str(good), str(bad), "--top-k", "2"]) == 1
    captured = capsys.readouterr()
    line = captured.out.strip()
    assert line.startswith(f"{good}: Trouser ") and line.count("%") == 2
    assert f"{bad}: error: not an image" in captured.err


def test_classify_json_and_model_option(images, capsys, tmp_path):
    good, _ = images
    assert main(["classify", str(good), "--json", "--model", str(DEFAULT_MODEL)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["file"] == str(good) and len(answer["predictions"]) == 3
    assert main(["classify", str(good), "--model", str(tmp_path / "missing.tflite")]) == 2
    assert "model file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"nonsense")
    with pytest.raises(ModelError, match="not a usable LiteRT model"):
        Classifier(broken)


def test_the_inference_path_never_imports_tensorflow_or_keras(images):
    good, _ = images
    code = (
        "import sys; from fmnist.cli import main; code = main(['classify', sys.argv[1]]); "
        "import fmnist.serve; "
        "heavy = [m for m in ('tensorflow', 'keras', 'sklearn', 'matplotlib') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(code or bool(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout


# How far the int8 export's probabilities may be from Keras' on the random images below (the untrained seed
# network gives near-uniform probabilities there, and its int8 rounding moves them by about 0.0002).
INT8_PROBABILITY_TOLERANCE = 0.01


def test_export_has_no_flex_ops_and_matches_keras(tmp_path):
    import keras
    import tensorflow as tf

    from fmnist import deploy, export
    from fmnist.inference import softmax
    from fmnist.model import build_network

    model = build_network("seed")
    rng = np.random.default_rng(0)
    images = rng.random((64, 28, 28, 1), dtype=np.float32)
    keras_probabilities = model.predict(images, verbose=0)
    logits = export.inference_graph(model).predict(images, verbose=0)[export.LOGITS]
    np.testing.assert_allclose(softmax(logits), keras_probabilities, atol=1e-6)
    float32, int8 = export.to_float32(model), export.to_int8(model)
    for name, content in (("float32", float32), ("int8", int8)):
        path = export.write_model(content, tmp_path / f"{name}.tflite")
        assert not any("Flex" in op for op in export.operators(path.read_bytes()))
        classifier = Classifier(path)
        assert classifier.outputs_logits, f"{name}: the export must output logits"
        assert classifier.interpreter.get_signature_list()["serving_default"]["outputs"] == [export.LOGITS]
    litert = Classifier(tmp_path / "float32.tflite").probabilities(images)
    assert litert.dtype == np.float32
    np.testing.assert_allclose(litert.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(litert, keras_probabilities, atol=1e-5)
    quantized = Classifier(tmp_path / "int8.tflite").probabilities(images)
    assert quantized.dtype == np.float32
    np.testing.assert_allclose(quantized.sum(axis=1), 1.0, atol=1e-5)
    runner_ups = np.sort(quantized, axis=1)[:, :-1]
    assert (runner_ups > 0).all(), "a softmax in float32 leaves no runner-up at exactly 0"
    assert np.abs(quantized - keras_probabilities).max() < INT8_PROBABILITY_TOLERANCE
    agreement = deploy.probability_agreement(tmp_path / "int8.tflite", images, keras_probabilities)
    assert agreement["p50"] <= agreement["p99"] <= agreement["max"] < INT8_PROBABILITY_TOLERANCE
    assert agreement["images"] == len(images)
    with pytest.raises(ValueError, match="one row of class probabilities per image"):
        deploy.probability_agreement(tmp_path / "int8.tflite", images, keras_probabilities[:10])
    assert deploy.compare_accuracy(0.9, {"float32": 0.9005, "int8": 0.897})[2]["difference_points"] < 0
    with pytest.raises(ValueError, match="int8: -0.60 points"):
        deploy.compare_accuracy(0.9, {"float32": 0.9, "int8": 0.894})

    # A model exported before the logits output (its softmax inside) is still read as probabilities.
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    older = export.write_model(converter.convert(), tmp_path / "probabilities.tflite")
    classifier = Classifier(older)
    assert not classifier.outputs_logits
    np.testing.assert_allclose(classifier.probabilities(images), keras_probabilities, atol=1e-5)

    with pytest.raises(ValueError, match="must be a Dense with a softmax activation"):
        export.inference_graph(keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten()]))


def test_the_quantisation_comparison_judges_each_scheme_as_served(tmp_path):
    from fmnist import deploy, export
    from fmnist.model import build_network

    model = build_network("seed")
    rng = np.random.default_rng(1)
    images = rng.random((48, 28, 28, 1), dtype=np.float32)
    labels = np.arange(48) % 10
    keras_probabilities = model.predict(images, verbose=0)
    exported = {
        "float32": export.write_model(export.to_float32(model), tmp_path / "model_float32.tflite"),
        "int8": export.write_model(export.to_int8(model), tmp_path / "model_int8.tflite"),
    }
    files = export.quantisation_variants(model, images[:16], exported, tmp_path)
    assert list(files) == ["float32", "float16 weights", "int8 full-integer", "int8 dynamic range"]
    assert files["float32"] == exported["float32"] and files["int8 dynamic range"] == exported["int8"]
    variants = {scheme: path.read_bytes() for scheme, path in files.items()}
    rows = {
        row["scheme"]: row
        for row in deploy.compare_quantisation(files, images, labels, keras_probabilities, latency_runs=10)
    }
    assert rows["float32"]["probability_p99"] < 1e-5
    assert rows["float16 weights"]["probability_p99"] < 1e-3
    sizes = [rows[scheme]["size_bytes"] for scheme in variants]
    assert sizes[0] > sizes[1] > max(sizes[2:]), sizes  # float32 > float16 > either int8.
    assert all(row["p50_ms"] > 0 and 0 <= row["test_accuracy"] <= 1 for row in rows.values())
    # Full-integer int8 has an int8 graph between float32 input and output; dynamic range keeps float32 layers.
    full = Classifier(files["int8 full-integer"])
    assert not full.quantized and "QUANTIZE" in export.operators(variants["int8 full-integer"])
    assert "QUANTIZE" not in export.operators(variants["int8 dynamic range"])
    with pytest.raises(ValueError, match="representative_images is empty"):
        export.to_full_integer_int8(model, images[:0])


def test_a_prediction_carries_the_image_the_model_saw(images):
    from fmnist.preprocess import prepare_image

    good, _ = images
    prediction = Classifier().classify(good, top_k=2)
    expected = np.rint(prepare_image(good) * 255).astype(np.uint8)
    assert prediction.model_input.dtype == np.uint8 and prediction.model_input.shape == (28, 28)
    np.testing.assert_array_equal(prediction.model_input, expected)
    assert "model_input" not in prediction.as_dict()
    answer = prediction.as_dict(include_input=True)
    seen = answer["model_input"]
    assert (seen["width"], seen["height"]) == (28, 28)
    assert seen["encoding"] == "base64, 784 uint8 grey values, row-major"
    pixels = np.frombuffer(base64.b64decode(seen["data"]), dtype=np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(pixels, expected)
    assert len(answer["predictions"]) == 2 and json.dumps(answer)
    with pytest.raises(ValueError, match="has no model input"):
        Prediction([("Trouser", 1.0)], 0.1).as_dict(include_input=True)


@pytest.mark.slow
def test_the_serve_extra_installs_and_classifies_without_tensorflow(images, tmp_path):
    """`pip install .[serve]` into an empty venv: numpy, Pillow and ai-edge-litert only."""
    from fmnist.config import PROJECT_ROOT

    good, _ = images
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", f"{PROJECT_ROOT}[serve]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    listing = subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True).stdout.lower()
    assert "ai-edge-litert" in listing and "tensorflow" not in listing and "keras" not in listing
    done = subprocess.run(
        [str(venv / "bin" / "fmnist"), "classify", str(good), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["predictions"][0]["class"] == "Trouser"
    # The server starts from the same install and answers.
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(venv / "bin" / "fmnist"), "serve", "--port", str(port)], cwd=tmp_path, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    assert json.loads(response.read())["status"] == "ok"
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_arithmetic_floor_is_the_work_over_the_measured_speed():
    from fmnist.bench import arithmetic_floor, matmul_gflops

    floor = arithmetic_floor(2_000_000, 40.0)
    assert floor["floor_ms"] == pytest.approx(0.1)  # 4 MFLOP at 40 GFLOP/s.
    assert matmul_gflops() > 1.0
    with pytest.raises(ValueError, match="must be positive"):
        arithmetic_floor(0, 40.0)
