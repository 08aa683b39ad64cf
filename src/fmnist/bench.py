"""``fmnist bench``: size, latency, throughput and serving figures of the deployed model.

A benchmark that prints figures and writes them to a JSON the report reads; it
asserts nothing. Keras and LiteRT run with one thread each so the figures
compare the models, not the thread pools. The serving figures come from a real
``fmnist serve`` process on loopback driven by a bounded load.
"""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fmnist.io import write_json


def percentiles(samples_seconds: list[float]) -> dict[str, float]:
    values = np.asarray(samples_seconds) * 1000.0
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "runs": len(values),
    }


def time_calls(function, runs: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return samples


def time_interleaved(functions: dict[str, Callable[[], object]], runs: int, slices: int = 10) -> dict[str, list[float]]:
    """``runs`` timed calls of each function, taken in ``slices`` turns: every function in turn for
    ``runs / slices`` calls, then again. A stall of a shared machine then falls on all of them alike instead
    of on whichever one was being timed, so their ratios hold."""
    slices = max(1, min(slices, runs))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():
        time_calls(function, 0)
    for turn in range(slices):
        calls = runs // slices + (1 if turn < runs % slices else 0)
        for name, function in functions.items():
            samples[name] += time_calls(function, calls, warmup=2)
    return samples


def throughput(function, batch: int, seconds: float = 3.0) -> float:
    """Images per second of ``function`` on one batch, called repeatedly for about ``seconds``."""
    function()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        function()
        count += 1
    return count * batch / (time.perf_counter() - started)


# Runs in a fresh process, whose thread pools start at the count asked for. TensorFlow's matrix multiply
# uses the CPU's widest vector units; numpy's OpenBLAS may be pinned to older kernels (OPENBLAS_CORETYPE,
# set on some of these machines), which made LiteRT beat the "floor" on an AVX-512 CPU.
_MATMUL_PROBE = """
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
threads, n = int(sys.argv[1]), int(sys.argv[2])
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(1)
a = tf.random.stateless_uniform((n, n), seed=(0, 0))
product = tf.function(lambda x: tf.linalg.matmul(x, x))
product(a).numpy()
best = float("inf")
for _ in range(20):
    started = time.perf_counter()
    product(a).numpy()
    best = min(best, time.perf_counter() - started)
print(2 * n**3 / best / 1e9)
"""


@functools.cache
def matmul_gflops(threads: int = 1) -> float:
    """This CPU's practical float32 peak: a 1024x1024 matrix product in TensorFlow (measured once a process).

    ``threads`` is the thread count; 0 means every core.
    """
    count = str(threads or os.cpu_count() or 1)
    probe = subprocess.run(
        [sys.executable, "-c", _MATMUL_PROBE, count, "1024"], env=os.environ.copy(), capture_output=True, text=True
    )
    if probe.returncode != 0:
        raise RuntimeError(f"the matrix-multiply probe failed: {probe.stderr.strip()[-300:]}")
    return float(probe.stdout.strip().splitlines()[-1])


def arithmetic_floor(multiply_adds: int, gflops: float) -> dict[str, float]:
    """The fastest one image can go if every multiply-add ran at the measured matrix-multiply speed."""
    if multiply_adds <= 0 or gflops <= 0:
        raise ValueError(f"multiply_adds={multiply_adds}, gflops={gflops}: both must be positive.")
    return {
        "multiply_adds": int(multiply_adds),
        "matmul_gflops_one_thread": round(gflops, 1),
        "floor_ms": 2 * multiply_adds / (gflops * 1e9) * 1e3,
    }


def litert_latency(model_paths: list[Path], images: np.ndarray, runs: int = 1000) -> dict[str, dict]:
    """Single-image LiteRT latency (one thread) and size of each model: plain, with flip TTA (two calls) and
    with flip TTA over the image and its four one-pixel shifts (ten calls, as a recipe's ``tta_shifts`` asks).

    Run it in a process that has not imported TensorFlow: TensorFlow's idle
    thread pools slow everything measured after them.
    """
    from fmnist.inference import Classifier
    from fmnist.manifest import describe_machine

    machine = describe_machine()  # Latencies compare only on one machine: each figure names its own.
    from fmnist.data import tta_views

    single, mirrored = images[:1], images[:1, :, ::-1]
    views = tta_views(single, 1)
    classifiers = {Path(path).name: Classifier(path, num_threads=1) for path in model_paths}
    plain = time_interleaved({name: lambda c=c: c.probabilities(single) for name, c in classifiers.items()}, runs)
    tta = time_interleaved(
        {name: lambda c=c: (c.probabilities(single), c.probabilities(mirrored)) for name, c in classifiers.items()},
        max(runs // 2, 1),
    )
    shift_tta = time_interleaved(
        {name: lambda c=c: [c.probabilities(view) for view in views] for name, c in classifiers.items()},
        max(runs // 10, 1),
    )
    figures = {}
    for path in model_paths:
        name = Path(path).name
        figures[name] = {
            "size_bytes": Path(path).stat().st_size,
            **percentiles(plain[name]),
            "tta_p50_ms": percentiles(tta[name])["p50_ms"],
            "shift_tta_p50_ms": percentiles(shift_tta[name])["p50_ms"],
            "machine": machine,
        }
    return figures


def sample_photo(image: np.ndarray, size: int = 224, image_format: str = "JPEG") -> bytes:
    """A Fashion-MNIST image as the page's camera sends a frame: dark article on white, RGB, 224x224 JPEG."""
    from PIL import Image

    grey = Image.fromarray((255 - np.squeeze(image) * 255).astype(np.uint8), mode="L").resize((size, size))
    buffer = io.BytesIO()
    grey.convert("RGB").save(buffer, format=image_format, quality=85)
    return buffer.getvalue()


def run_benchmark(
    keras_model_path: Path,
    litert_models: dict[str, Path],
    images: np.ndarray,
    *,
    out: Path | None,
    runs: int = 2000,
    keras_runs: int = 200,
    batch: int = 256,
    clients: int = 32,
    seconds: float = 20.0,
    rate_per_client: float = 5.0,
    closed_clients: int = 64,
    slow_clients: int = 500,
    serve_model: str = "int8",
    serve_file: Path | None = None,
) -> dict:
    """Measure everything in one process (one thread per engine) and write ``out`` as JSON.

    The serving figures use ``serve_file`` when given (the shipped classifier, ``serve_model`` naming it),
    else ``litert_models[serve_model]``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        print("bench: TensorFlow already initialised; Keras runs with its default threads", file=sys.stderr)
    import keras

    from fmnist.inference import Classifier

    def say(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    single = images[:1]
    many = images[:batch]
    results: dict = {"sizes_bytes": {"keras": Path(keras_model_path).stat().st_size}, "latency": {}, "throughput": {}}
    # LiteRT first: once Keras has run, TensorFlow's thread pools keep spinning and slow everything after.
    for name, path in litert_models.items():
        results["sizes_bytes"][f"litert_{name}"] = Path(path).stat().st_size
        say(f"LiteRT {name}, one image ...")
        classifier = Classifier(path, num_threads=1)
        samples = time_calls(lambda c=classifier: c.probabilities(single), runs)
        results["latency"][f"litert_{name}"] = percentiles(samples)
        results["throughput"][f"litert_{name}"] = throughput(lambda c=classifier: c.probabilities(many), batch)
    model = keras.models.load_model(keras_model_path)
    from fmnist.model import multiply_adds

    say("one-thread matrix-multiply speed (the arithmetic floor) ...")
    results["floor"] = arithmetic_floor(multiply_adds(model), matmul_gflops())
    say("Keras model.predict, one image ...")
    results["latency"]["keras_predict"] = percentiles(time_calls(lambda: model.predict(single, verbose=0), keras_runs))
    say("Keras direct call, one image ...")
    results["latency"]["keras_call"] = percentiles(time_calls(lambda: model(single, training=False), keras_runs * 5))
    results["throughput"]["keras_predict"] = throughput(lambda: model.predict(many, batch_size=batch, verbose=0), batch)
    results["throughput"]["keras_call"] = throughput(lambda: model(many, training=False), batch)
    # Keras first in the tables: it is the baseline of the speed-ups.
    for table in ("latency", "throughput"):
        results[table] = {
            name: results[table][name]
            for name in ("keras_predict", "keras_call", *(f"litert_{n}" for n in litert_models))
        }
    predict_p50 = results["latency"]["keras_predict"]["p50_ms"]
    results["speedup_vs_predict"] = {
        name: predict_p50 / figures["p50_ms"] for name, figures in results["latency"].items()
    }
    body = sample_photo(images[0])
    from fmnist.loadtest import run_loadtest

    served = Path(serve_file) if serve_file is not None else Path(litert_models[serve_model])
    say(f"serving {serve_model} ({served.name}): a fresh `fmnist serve` process, loaded and abused ...")
    results["serving"] = {
        "model": serve_model,
        "file": served.name,
        "size_bytes": served.stat().st_size,
        "request_image": f"{len(body):,}-byte 224x224 RGB JPEG (a camera frame)",
        **run_loadtest(
            served,
            body,
            paced_clients=clients,
            rate_per_client=rate_per_client,
            closed_clients=closed_clients,
            seconds=seconds,
            slow_count=slow_clients,
            say=say,
        ),
    }
    results["settings"] = {
        "runs": runs,
        "keras_runs": keras_runs,
        "batch": batch,
        "threads": 1,
        "cpu_count": os.cpu_count(),
    }
    # Figures mean little without the machine and the versions that made them.
    from fmnist.manifest import machine, package_versions

    results["machine"] = machine()
    results["packages"] = package_versions()
    if out:
        write_json(out, results)
    return results


def format_results(results: dict) -> str:
    lines = ["model size:"]
    lines += [f"  {name:<16} {size / 1024:9.1f} KB" for name, size in results["sizes_bytes"].items()]
    lines.append("single image, one thread (ms):        p50       p99   speed-up vs predict")
    for name, figures in results["latency"].items():
        speedup = results["speedup_vs_predict"][name]
        lines.append(f"  {name:<22} {figures['p50_ms']:12.4f} {figures['p99_ms']:9.4f} {speedup:12.0f}x")
    floor = results.get("floor")
    if floor:
        lines.append(
            f"arithmetic floor: {floor['multiply_adds'] / 1e6:.2f} M multiply-adds at "
            f"{floor['matmul_gflops_one_thread']:.0f} GFLOP/s (one-thread matrix multiply) = {floor['floor_ms']:.3f} ms"
        )
    lines.append("batch throughput (images/s):")
    lines += [f"  {name:<22} {value:12,.0f}" for name, value in results["throughput"].items()]
    lines.append(format_serving(results["serving"]))
    return "\n".join(lines)


def format_serving(serving: dict) -> str:
    """The load test's figures as lines of text (``fmnist bench`` and ``fmnist loadtest`` print them)."""
    idle, load, closed, slow, hostile = (
        serving["idle"],
        serving["load"],
        serving["closed_loop"],
        serving["slow"],
        serving["hostile"],
    )
    healthz = slow["healthz"]
    return "\n".join(
        [
            f"serving ({serving.get('model', 'int8')}): cold start to first answer "
            f"{serving['cold_start_to_first_answer_s']:.2f} s, peak RSS {serving['peak_rss_mb']:.0f} MB, "
            f"{serving['log_lines']} log lines ({serving['log_tracebacks']} tracebacks)",
            f"  idle, one request at a time: p50 {idle['p50_ms']:.2f} ms, p99 {idle['p99_ms']:.2f} ms",
            f"  paced ({load['clients']} clients x {load['rate_per_client']:g} req/s, {load['seconds']:.0f} s): "
            f"{load['requests']} requests, p50 {load['p50_ms']:.2f} ms, p99 {load['p99_ms']:.2f} ms, "
            f"errors {load['errors']}",
            f"  closed loop ({closed['clients']} clients back to back, {closed['seconds']:.0f} s): "
            f"{closed['requests_per_second']:,.0f} req/s, p50 {closed['p50_ms']:.2f} ms, "
            f"p99 {closed['p99_ms']:.2f} ms, "
            f"errors {closed['errors']}, peak RSS {closed['peak_rss_mb']:.0f} MB",
            f"  {slow['slow_clients']} slow clients: /healthz p50 {healthz['p50_ms']:.2f} ms, "
            f"p99 {healthz['p99_ms']:.2f} ms, errors {healthz['errors']}",
            f"  {hostile['clients']} concurrent hostile decodes: peak RSS {hostile['peak_rss_mb']:.0f} MB, "
            f"server errors {hostile['server_errors']}",
        ]
    )
