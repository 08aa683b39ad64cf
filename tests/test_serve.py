"""The HTTP service as clients, polite and hostile, see it: a real uvicorn server on loopback, shipped model."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from fmnist.inference import Classifier
from fmnist.serve import MAX_BODY_BYTES, MAX_HEADER_BYTES, SECURITY_HEADERS, BackgroundServer, Limits

from pictures import trouser

# Short timeouts, so the timeout tests take a second rather than ten.
TEST_LIMITS = Limits(header_timeout=1.0, body_timeout=1.0, max_connections=64)


@pytest.fixture(scope="module")
def classifier():
    return Classifier()


@pytest.fixture(scope="module")
def server(classifier):
    with BackgroundServer(classifier, limits=TEST_LIMITS) as url:
        yield int(url.rstrip("/").rsplit(":", 1)[1])


def request(port, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, {name.lower(): value for name, value in response.getheaders()}, payload


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], dict]:
    """Send raw bytes, read until the server closes: the status, headers and JSON body of its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def png_bytes(array: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def multipart(field: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = "fmnist-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def assert_alive(port):
    status, _, payload = request(port, "GET", "/healthz")
    assert status == 200 and json.loads(payload)["status"] == "ok"


def assert_error_shape(status, headers, payload, expected_status, message):
    assert status == expected_status and headers["content-type"] == "application/json"
    answer = json.loads(payload) if isinstance(payload, bytes) else payload
    assert set(answer) == {"error", "status"} and answer["status"] == expected_status
    assert message in answer["error"], answer["error"]
    assert "Traceback" not in answer["error"]


def test_healthz_page_head_and_security_headers(server):
    assert_alive(server)
    status, headers, payload = request(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    for name, value in SECURITY_HEADERS.items():
        assert headers[name] == value
    assert "server" not in headers  # No server name, let alone its version.
    status, headers, payload = request(server, "HEAD", "/healthz")
    assert status == 200 and payload == b"" and headers["content-type"] == "application/json"


def test_predict_multipart_and_raw_body_with_the_image_the_model_saw(server):
    body, headers = multipart("file", png_bytes(trouser()))
    status, response_headers, payload = request(server, "POST", "/predict", body, headers)
    assert status == 200 and response_headers["content-type"] == "application/json"
    answer = json.loads(payload)
    classes = [entry["class"] for entry in answer["predictions"]]
    probabilities = [entry["probability"] for entry in answer["predictions"]]
    assert len(classes) == 3 and classes[0] == "Trouser"
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
    assert 0 < answer["inference_ms"] < 1000
    seen = answer["model_input"]
    pixels = np.frombuffer(base64.b64decode(seen["data"]), dtype=np.uint8).reshape(seen["height"], seen["width"])
    assert pixels.shape == (28, 28) and pixels.max() > 200 and pixels[0, 0] == 0  # A light article on black.
    status, _, payload = request(
        server, "POST", "/predict?top_k=5", png_bytes(trouser()), {"Content-Type": "image/png"}
    )
    assert status == 200 and len(json.loads(payload)["predictions"]) == 5


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"", {}, 400, "empty input"),
        (b"not an image", {"Content-Type": "image/png"}, 422, "not an image"),
        (png_bytes(trouser())[:300], {}, 422, "truncated or corrupt"),
        (*multipart("picture", png_bytes(trouser())), 400, "no field 'file'"),
        (b"--x\r\nbroken", {"Content-Type": "multipart/form-data; boundary=x"}, 400, "no field 'file'"),
        (b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=" + "B" * 5000}, 400, "valid boundary"),
        (b"{}", {"Content-Type": "application/json"}, 415, "is not accepted"),
        (png_bytes(trouser(), "TIFF"), {"Content-Type": "image/tiff"}, 415, "is not accepted"),
        # Sniffed, not declared: Pillow is only offered the five accepted formats.
        (png_bytes(trouser(), "TIFF"), {}, 422, "PNG, JPEG, WebP, BMP"),
    ],
)
def test_bad_input_gets_the_error_shape_and_the_server_keeps_serving(server, body, headers, status, message):
    assert_error_shape(*request(server, "POST", "/predict", body, headers), status, message)
    assert_alive(server)


@pytest.mark.parametrize("top_k", ["0", "11", "-1", "three", "%C2%B2", "%EF%BC%93"])
def test_bad_top_k_is_a_422(server, top_k):
    assert_error_shape(*request(server, "POST", f"/predict?top_k={top_k}", png_bytes(trouser())), 422, "top_k")


def test_paths_and_methods(server):
    assert_error_shape(*request(server, "GET", "/nope"), 404, "no such page")
    status, headers, payload = request(server, "DELETE", "/healthz")
    assert_error_shape(status, headers, payload, 405, "not allowed")
    assert set(headers["allow"].split(", ")) == {"GET", "HEAD"}
    status, headers, payload = request(server, "BREW", "/predict")
    assert_error_shape(status, headers, payload, 405, "use POST")
    assert request(server, "GET", "/openapi.json")[0] == 200
    status, headers, payload = request(server, "GET", "/docs")
    assert status == 200 and b"POST /predict" in payload and b"top_k" in payload


def test_framing_errors_are_json_with_the_right_status(server):
    image = png_bytes(trouser())
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(image)}\r\n"
    duplicate = f"{head}Content-Length: {len(image) + 1}\r\n\r\n".encode() + image
    assert_error_shape(*raw_exchange(server, duplicate), 400, "bad HTTP request")
    smuggled = f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + b"0\r\n\r\n"
    unknown_coding = b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    assert_error_shape(*raw_exchange(server, unknown_coding), 400, "bad HTTP request")
    assert_error_shape(*raw_exchange(server, smuggled), 400, "Transfer-Encoding and Content-Length")
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n"
    assert_error_shape(*raw_exchange(server, huge), 431, "headers")
    long_url = b"GET /" + b"a" * MAX_HEADER_BYTES + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_error_shape(*raw_exchange(server, long_url), 431, "headers")
    no_length = b"POST /predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert_error_shape(*raw_exchange(server, no_length), 411, "Content-Length is required")
    assert_alive(server)


def test_chunked_upload_is_accepted(server):
    image = png_bytes(trouser())
    data = b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    data += f"{len(image):x}\r\n".encode() + image + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server), timeout=10) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and b'"Trouser"' in received


def test_oversize_upload_is_refused_without_reading_it(server):
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    assert response.getheader("Connection") == "close"
    connection.close()
    assert_alive(server)


def test_slow_headers_and_slow_bodies_get_a_408(server):
    started = time.perf_counter()
    assert_error_shape(*raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHo"), 408, "headers did not arrive")
    short_body = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
    assert_error_shape(*raw_exchange(server, short_body), 408, "did not arrive within")
    assert time.perf_counter() - started < 6  # Two 1-second timeouts, not the client's own 10 s.
    assert_alive(server)


def test_connections_beyond_the_cap_get_a_503(server):
    held = [socket.create_connection(("127.0.0.1", server)) for _ in range(TEST_LIMITS.max_connections)]
    try:
        time.sleep(0.2)
        assert_error_shape(*raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"), 503, "connections")
    finally:
        for connection in held:
            connection.close()
    time.sleep(0.2)
    assert_alive(server)


def test_a_full_body_budget_answers_503_with_retry_after(classifier):
    limits = Limits(body_budget_bytes=100_000, queue_wait=0.3, body_timeout=5.0, header_timeout=5.0)
    with BackgroundServer(classifier, limits=limits) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        # Declaring a large body holds nothing: only bytes that arrive count.
        bluff = socket.create_connection(("127.0.0.1", port))
        bluff.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nxx")
        time.sleep(0.3)
        assert request(port, "POST", "/predict", png_bytes(trouser()))[0] == 200
        # One client that has really sent most of the budget, and stalls, makes the next upload wait, then 503.
        hog = socket.create_connection(("127.0.0.1", port))
        hog.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 99_990)
        time.sleep(0.3)
        status, headers, payload = request(port, "POST", "/predict", png_bytes(trouser()))
        assert_error_shape(status, headers, payload, 503, "busy")
        assert headers["retry-after"] == "1"
        hog.close()
        bluff.close()
        time.sleep(0.3)
        assert request(port, "POST", "/predict", png_bytes(trouser()))[0] == 200


def test_an_oversized_upload_sent_whole_still_reads_its_413(server):
    """A client that sends the whole body before reading gets the answer, not a connection reset."""
    oversized = b"x" * (MAX_BODY_BYTES + 1024)
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(oversized)}\r\n\r\n".encode()
    status, headers, answer = raw_exchange(server, head + oversized)
    assert_error_shape(status, headers, answer, 413, "limit")


def test_failures_log_one_line_without_tracebacks(classifier, caplog, monkeypatch):
    with BackgroundServer(classifier, limits=TEST_LIMITS) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        with caplog.at_level(logging.INFO):
            request(port, "POST", "/predict", b"not an image", {"Content-Type": "image/png"})
            # A client that hangs up halfway through its body.
            dropped = socket.create_connection(("127.0.0.1", port))
            dropped.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
            dropped.close()
            time.sleep(0.3)
            # An unexpected failure inside: a 500 in the one shape, the details only in the log.
            monkeypatch.setattr(classifier, "classify", lambda *args, **kwargs: 1 / 0)
            status, headers, payload = request(port, "POST", "/predict", png_bytes(trouser()))
            assert_error_shape(status, headers, payload, 500, "internal error (ZeroDivisionError)")
            time.sleep(0.2)
    records = [record for record in caplog.records if record.name.startswith(("fmnist", "uvicorn"))]
    assert any("422" in record.getMessage() and "not an image" in record.getMessage() for record in records)
    assert any("ZeroDivisionError" in record.getMessage() for record in records)
    assert not any(record.exc_info for record in records), [r.getMessage() for r in records if r.exc_info]
    assert "Traceback" not in caplog.text


def test_concurrent_requests_all_succeed(server):
    body = png_bytes(trouser())
    statuses = []

    def client():
        for _ in range(10):
            statuses.append(request(server, "POST", "/predict", body)[0])

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 80
