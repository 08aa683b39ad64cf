"""The real-time path: shipped model, CLI, no TensorFlow, and the export it comes from."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fmnist.cli import main
from fmnist.inference import DEFAULT_MODEL, Classifier, ModelError


@pytest.fixture
def images(tmp_path):
    page = np.full((120, 120), 250, dtype=np.uint8)
    page[10:110, 30:55] = 20
    page[10:110, 65:90] = 20
    page[10:30, 30:90] = 20
    good = tmp_path / "trousers.jpg"
    Image.fromarray(page).convert("RGB").save(good)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    return good, bad


def test_the_shipped_model_is_small_and_accurate_on_test_images():
    from fmnist import data

    assert DEFAULT_MODEL.is_file() and DEFAULT_MODEL.stat().st_size <= 230 * 1024
    dataset = data.load_fashion_mnist()
    probabilities = Classifier().probabilities(dataset.x_test[:1000])
    assert (probabilities.argmax(axis=1) == dataset.y_test[:1000]).mean() > 0.85


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
        "from fmnist.serve import make_server; "
        "heavy = [m for m in ('tensorflow', 'keras', 'sklearn', 'matplotlib') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(code or bool(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout


def test_export_has_no_flex_ops_and_matches_keras(tmp_path):
    from fmnist import deploy, export
    from fmnist.model import build_network

    model = build_network("seed")
    rng = np.random.default_rng(0)
    images = rng.random((64, 28, 28, 1), dtype=np.float32)
    float32, int8 = export.to_float32(model), export.to_int8(model, images[:32])
    for name, content in (("float32", float32), ("int8", int8)):
        path = export.write_model(content, tmp_path / f"{name}.tflite")
        assert not any("Flex" in op for op in export.operators(path.read_bytes()))
    keras_probabilities = model.predict(images, verbose=0)
    litert = Classifier(tmp_path / "float32.tflite").probabilities(images)
    np.testing.assert_allclose(litert, keras_probabilities, atol=1e-4)
    quantized = Classifier(tmp_path / "int8.tflite").probabilities(images)
    assert np.abs(quantized - keras_probabilities).max() < 0.1
    assert deploy.compare_accuracy(0.9, {"float32": 0.9005, "int8": 0.897})[2]["difference_points"] < 0
    with pytest.raises(ValueError, match="int8: -0.60 points"):
        deploy.compare_accuracy(0.9, {"float32": 0.9, "int8": 0.894})


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


def test_the_arithmetic_floor_is_the_work_over_the_measured_speed():
    from fmnist.bench import arithmetic_floor, matmul_gflops

    floor = arithmetic_floor(2_000_000, 40.0)
    assert floor["floor_ms"] == pytest.approx(0.1)  # 4 MFLOP at 40 GFLOP/s.
    assert matmul_gflops() > 1.0
    with pytest.raises(ValueError, match="must be positive"):
        arithmetic_floor(0, 40.0)
