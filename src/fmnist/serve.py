"""The real-time classifier as a small web app: a page and a JSON API, standard library only.

- ``GET /``: a page to drop, paste or pick an image, or turn on the camera;
  the top-3 classes appear at once (camera frames are classified continuously).
- ``POST /predict``: the image as multipart field ``file`` or as the raw body;
  answers ``{"predictions": [{"class", "probability"}...], "inference_ms"}``.
- ``GET /healthz``: ``{"status": "ok", "model": ...}``.

Bad input gets a 4xx JSON error and the server keeps serving. It binds to
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
import json
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from fmnist.inference import Classifier
from fmnist.preprocess import MAX_UPLOAD_BYTES, ImageError

# Headroom over the image limit for the multipart envelope.
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
SOCKET_TIMEOUT_SECONDS = 10


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def extract_image(content_type: str, body: bytes) -> bytes:
    """The image bytes of a request: the multipart field ``file``, or the whole body."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    if not message.is_multipart():
        raise RequestError(HTTPStatus.BAD_REQUEST, "malformed multipart body: send the image as field 'file'.")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True) or b""
    raise RequestError(HTTPStatus.BAD_REQUEST, "multipart body has no field 'file': send the image as field 'file'.")


@functools.cache
def page() -> bytes:
    """The single-page app, read from the package once."""
    return resources.files("fmnist").joinpath("assets/index.html").read_bytes()


def make_handler(classifier: Classifier, top_k: int = 3) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = SOCKET_TIMEOUT_SECONDS
        # Headers and body go out in separate writes; without this, Nagle's algorithm and delayed ACKs
        # add ~40 ms to every keep-alive response.
        disable_nagle_algorithm = True
        server_version = "fmnist"

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature.
            if self.server.verbose:
                super().log_message(format, *args)

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._json(status, {"error": message, "status": int(status)})

        def do_GET(self):  # noqa: N802 - http.server's naming.
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._json(HTTPStatus.OK, {"status": "ok", "model": classifier.model_path.name})
            elif path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page(), "text/html; charset=utf-8")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}; try / or POST /predict.")

        def do_POST(self):  # noqa: N802
            if self.path.split("?", 1)[0] != "/predict":
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}; POST images to /predict.")
                return
            image = b""
            try:
                length = self.headers.get("Content-Length")
                if length is None:
                    self.close_connection = True
                    raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required.")
                if not length.isdigit():
                    self.close_connection = True
                    raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}.")
                if int(length) > MAX_BODY_BYTES:
                    # The body is not read: close the connection after answering.
                    self.close_connection = True
                    raise RequestError(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"upload of {int(length):,} bytes is over the {MAX_UPLOAD_BYTES:,}-byte limit.",
                    )
                body = self.rfile.read(int(length))
                if len(body) < int(length):
                    self.close_connection = True
                    raise RequestError(HTTPStatus.BAD_REQUEST, "the body ended before Content-Length bytes.")
                image = extract_image(self.headers.get("Content-Type", ""), body)
                prediction = classifier.classify(image, top_k=top_k)
            except RequestError as error:
                self._error(error.status, str(error))
            except ImageError as error:
                self._error(HTTPStatus.UNPROCESSABLE_ENTITY if image else HTTPStatus.BAD_REQUEST, str(error))
            except Exception as error:  # noqa: BLE001 - the server must keep serving whatever happens.
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(error).__name__}: {error}")
            else:
                self._json(HTTPStatus.OK, prediction.as_dict())

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    verbose = False


def make_server(classifier: Classifier, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> Server:
    server = Server((host, port), make_handler(classifier))
    server.verbose = verbose
    return server


def serve(model_path=None, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> None:
    started = time.perf_counter()
    classifier = Classifier(model_path)
    server = make_server(classifier, host, port, verbose)
    address = f"http://{host}:{server.server_address[1]}/"
    print(
        f"fmnist serve: {classifier.model_path.name} ready in {time.perf_counter() - started:.2f} s at {address} "
        "(Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
