"""The JSON API and page, against a real server on loopback with the shipped model."""

from __future__ import annotations

import http.client
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from fmnist.inference import Classifier
from fmnist.serve import MAX_BODY_BYTES, make_server


@pytest.fixture(scope="module")
def server():
    instance = make_server(Classifier(), port=0)
    thread = threading.Thread(target=instance.serve_forever, daemon=True)
    thread.start()
    yield instance.server_address[1]
    instance.shutdown()
    instance.server_close()


def request(port, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, response.getheader("Content-Type"), payload


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
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


def trouser() -> np.ndarray:
    """Two dark legs on white: the easiest class there is."""
    page = np.full((200, 200), 255, dtype=np.uint8)
    page[20:190, 60:95] = 30
    page[20:190, 105:140] = 30
    page[20:50, 60:140] = 30
    return page


def assert_alive(port):
    status, _, payload = request(port, "GET", "/healthz")
    assert status == 200 and json.loads(payload)["status"] == "ok"


def test_healthz_and_page(server):
    assert_alive(server)
    status, content_type, payload = request(server, "GET", "/")
    assert status == 200 and content_type.startswith("text/html")
    assert b'id="drop"' in payload and b"/predict" in payload and b"getUserMedia" in payload


def test_predict_with_multipart_field_file(server):
    body, headers = multipart("file", png_bytes(trouser()))
    status, content_type, payload = request(server, "POST", "/predict", body, headers)
    assert status == 200 and content_type == "application/json"
    answer = json.loads(payload)
    classes = [entry["class"] for entry in answer["predictions"]]
    probabilities = [entry["probability"] for entry in answer["predictions"]]
    assert len(classes) == 3 and classes[0] == "Trouser"
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
    assert 0 < answer["inference_ms"] < 1000


def test_predict_with_raw_body(server):
    status, _, payload = request(server, "POST", "/predict", png_bytes(trouser()), {"Content-Type": "image/png"})
    assert status == 200 and json.loads(payload)["predictions"][0]["class"] == "Trouser"


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"", {}, 400, "empty input"),
        (b"not an image", {"Content-Type": "image/png"}, 422, "not an image"),
        (png_bytes(trouser())[:300], {}, 422, "truncated or corrupt"),
        (*multipart("picture", png_bytes(trouser())), 400, "no field 'file'"),
    ],
)
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(server, body, headers, status, message):
    got_status, content_type, payload = request(server, "POST", "/predict", body, headers)
    assert got_status == status and content_type == "application/json"
    assert message in json.loads(payload)["error"]
    assert_alive(server)


def test_oversize_upload_is_refused_without_reading_it(server):
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    connection.close()
    assert_alive(server)


def test_missing_length_unknown_paths_and_methods(server):
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    connection.putrequest("POST", "/predict")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411
    connection.close()
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "POST", "/other", b"x")[0] == 404
    assert_alive(server)


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
