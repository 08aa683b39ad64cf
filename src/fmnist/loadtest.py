"""Load and abuse figures of ``fmnist serve``: a real server process on loopback, driven as clients would.

The phases, in order, against one fresh server process:

1. **idle**: one client, one request at a time: the latency a lone user sees;
2. **hostile decodes**: ``hostile_clients`` clients at once sending images built to cost memory
   or time (a 16-bit PNG that claims 6300x6300 pixels, a 24-megapixel JPEG, a 2048x2048 RGBA
   PNG, a corrupt GIF, a TIFF): statuses and the peak RSS after them;
3. **paced**: ``paced_clients`` clients at a steady rate each, the report's "under load";
4. **closed loop**: ``closed_clients`` clients sending back to back: errors, p50, p99, requests/s;
5. **slow clients**: ``slow_clients`` connections that trickle their headers a byte a second
   (reconnecting when the server cuts them off), while a normal client polls ``/healthz``.

Each phase records the server's peak RSS so far (Linux ``VmHWM``), and the end records how many
lines the server logged and whether any was a traceback. Figures only: nothing here asserts.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from fmnist.bench import percentiles


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set so far, in MB (Linux only)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def post(connection: http.client.HTTPConnection, body: bytes, content_type: str = "image/jpeg") -> int:
    connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
    response = connection.getresponse()
    response.read()
    return response.status


class ServerProcess:
    """``fmnist serve`` in its own process, its log in a file: ``with ServerProcess(model) as server``."""

    def __init__(self, model_path: Path, probe_body: bytes, *extra_arguments: str):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="fmnist-serve-", suffix=".log", delete=False)  # noqa: SIM115
        self.command = [
            sys.executable,
            "-m",
            "fmnist",
            "serve",
            "--port",
            str(self.port),
            "--model",
            str(model_path),
            *extra_arguments,
        ]
        self.probe_body = probe_body
        self.process: subprocess.Popen | None = None
        self.cold_start_s: float | None = None

    def __enter__(self) -> ServerProcess:
        started = time.perf_counter()
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self.log, env=environment)
        while time.perf_counter() - started < 30:
            if self.process.poll() is not None:
                raise RuntimeError(f"fmnist serve exited:\n{Path(self.log.name).read_text()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                if post(connection, self.probe_body) == 200:
                    self.cold_start_s = time.perf_counter() - started
                    connection.close()
                    return self
            except OSError:
                time.sleep(0.02)
        self.__exit__()
        raise RuntimeError("fmnist serve did not answer within 30 s.")

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.process.pid)

    def log_figures(self) -> dict[str, int]:
        text = Path(self.log.name).read_text(errors="replace")
        return {"log_lines": len(text.splitlines()), "log_tracebacks": text.count("Traceback")}

    def __exit__(self, *exc_info) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        Path(self.log.name).unlink(missing_ok=True)


def synthetic_article() -> np.ndarray:
    """A 28x28 pair of trousers, light on black in [0, 1]: a request body that needs no dataset."""
    image = np.zeros((28, 28), dtype=np.float32)
    image[3:26, 8:13] = 0.8
    image[3:26, 15:20] = 0.8
    image[3:7, 8:20] = 0.8
    return image


# -- Phases.


def idle_latency(port: int, body: bytes, runs: int = 200) -> dict[str, float]:
    """One keep-alive client, one request at a time."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(10):
        post(connection, body)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        status = post(connection, body)
        samples.append(time.perf_counter() - started)
        if status != 200:
            raise RuntimeError(f"the idle server answered {status} to a good image.")
    connection.close()
    return percentiles(samples)


def http_load(port: int, body: bytes, clients: int, seconds: float, rate_per_client: float) -> dict[str, object]:
    """``clients`` threads on keep-alive connections, each at ``rate_per_client`` requests/s (0: back to back)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    interval = 1.0 / rate_per_client if rate_per_client > 0 else 0.0

    def client(offset: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        next_send = time.perf_counter() + offset
        local, local_errors = [], []
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            if interval and now < next_send:
                time.sleep(next_send - now)
            started = time.perf_counter()
            try:
                status = post(connection, body)
                if status != 200:
                    local_errors.append(f"HTTP {status}")
            except (OSError, http.client.HTTPException) as error:
                local_errors.append(type(error).__name__)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            local.append(time.perf_counter() - started)
            next_send += interval
        connection.close()
        with lock:
            latencies.extend(local)
            errors.extend(local_errors)

    threads = [threading.Thread(target=client, args=(i * interval / clients,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "rate_per_client": rate_per_client,
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        **percentiles(latencies),
    }


def hostile_images() -> dict[str, tuple[bytes, str]]:
    """Uploads built to cost the decoder memory or time, each with the Content-Type a client would claim."""
    from PIL import Image

    def encoded(image: Image.Image, image_format: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **options)
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    # The largest image the decoder accepts in full: 2048x2048 RGBA, a gradient so that the upload stays small.
    ramp = np.add.outer(np.arange(2048), np.arange(2048)) // 16
    gradient = Image.fromarray(np.dstack([ramp, ramp[::-1], ramp.T, np.full_like(ramp, 255)]).astype(np.uint8))
    photo = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), mode="RGB").resize((6000, 4000))
    gif = encoded(Image.new("P", (512, 512)), "GIF")
    return {
        "png_16bit_6300x6300": (encoded(Image.new("I;16", (6300, 6300)), "PNG"), "image/png"),
        "jpeg_6000x4000": (encoded(photo, "JPEG", quality=80), "image/jpeg"),
        "png_rgba_2048x2048": (encoded(gradient, "PNG"), "image/png"),
        "gif_truncated": (gif[: len(gif) // 2], "image/gif"),
        "tiff": (encoded(Image.new("L", (64, 64)), "TIFF"), "image/tiff"),
    }


def hostile_decodes(port: int, clients: int = 8, seconds: float = 5.0) -> dict[str, object]:
    """``clients`` threads at once, each cycling through :func:`hostile_images`: the statuses they got."""
    images = list(hostile_images().items())
    statuses: dict[str, Counter] = {name: Counter() for name, _ in images}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        index = offset
        while time.perf_counter() < deadline:
            name, (body, content_type) = images[index % len(images)]
            try:
                status = str(post(connection, body, content_type))
            except (OSError, http.client.HTTPException) as error:
                status = type(error).__name__
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                statuses[name][status] += 1
            index += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = Counter()
    for counter in statuses.values():
        total.update(counter)
    return {
        "clients": clients,
        "seconds": seconds,
        "statuses": {name: dict(counter) for name, counter in statuses.items()},
        "server_errors": sum(count for status, count in total.items() if not status.startswith(("2", "4"))),
    }


async def _slow_clients(port: int, count: int, seconds: float) -> dict[str, int]:
    """``count`` connections that send a request head one byte a second, reconnecting when cut off."""
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 100\r\n"
    figures = Counter()
    deadline = asyncio.get_running_loop().time() + seconds

    async def one() -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                figures["connect_errors"] += 1
                await asyncio.sleep(0.5)
                continue
            figures["connections"] += 1
            closed = asyncio.ensure_future(reader.read())  # Done when the server closes the connection.
            try:
                for byte in head:
                    if loop.time() >= deadline or closed.done():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.wait([closed], timeout=1.0)
                if closed.done():
                    figures["cut_off_by_server"] += 1
            except OSError:
                figures["cut_off_by_server"] += 1
            finally:
                closed.cancel()
                writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return dict(figures)


def slow_clients(port: int, count: int = 500, seconds: float = 20.0, poll_interval: float = 0.02) -> dict[str, object]:
    """``count`` slow clients held open while a normal client polls ``/healthz`` on fresh connections."""
    result: dict[str, object] = {}
    attack = threading.Thread(target=lambda: result.update(asyncio.run(_slow_clients(port, count, seconds))))
    attack.start()
    time.sleep(min(3.0, seconds / 4))  # Let the slow connections pile up first.
    samples, failures = [], Counter()
    while attack.is_alive():
        started = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status != 200:
                failures[f"HTTP {response.status}"] += 1
        except (OSError, http.client.HTTPException) as error:
            failures[type(error).__name__] += 1
        samples.append(time.perf_counter() - started)
        time.sleep(poll_interval)
    attack.join()
    return {
        "slow_clients": count,
        "seconds": seconds,
        "slow_client_figures": result,
        "healthz": {**percentiles(samples), "errors": sum(failures.values()), "error_kinds": sorted(failures)},
    }


def run_loadtest(
    model_path: Path,
    body: bytes,
    *,
    paced_clients: int = 32,
    rate_per_client: float = 5.0,
    closed_clients: int = 64,
    seconds: float = 20.0,
    hostile_clients: int = 8,
    slow_count: int = 500,
    say=print,
) -> dict[str, object]:
    """Every phase against one fresh server process; the figures as a dict for ``bench.json``."""
    with ServerProcess(model_path, body) as server:
        figures: dict[str, object] = {"cold_start_to_first_answer_s": round(server.cold_start_s, 3)}
        say("idle: one client, one request at a time ...")
        figures["idle"] = idle_latency(server.port, body)
        say(f"hostile decodes: {hostile_clients} clients at once for {min(seconds, 5.0):g} s ...")
        figures["hostile"] = hostile_decodes(server.port, hostile_clients, min(seconds, 5.0))
        figures["hostile"]["peak_rss_mb"] = server.peak_rss_mb()
        say(f"paced: {paced_clients} clients x {rate_per_client:g} requests/s for {seconds:g} s ...")
        figures["load"] = http_load(server.port, body, paced_clients, seconds, rate_per_client)
        say(f"closed loop: {closed_clients} clients back to back for {seconds:g} s ...")
        figures["closed_loop"] = http_load(server.port, body, closed_clients, seconds, 0.0)
        figures["closed_loop"]["peak_rss_mb"] = server.peak_rss_mb()
        say(f"slow clients: {slow_count} trickling headers for {seconds:g} s while /healthz is polled ...")
        figures["slow"] = slow_clients(server.port, slow_count, seconds)
        figures["peak_rss_mb"] = server.peak_rss_mb()
        if server.process.poll() is not None:
            raise RuntimeError(f"fmnist serve died during the load test (exit {server.process.returncode}).")
        figures.update(server.log_figures())
    return figures
