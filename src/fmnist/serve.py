"""The real-time classifier as a web service: a page and a JSON API on Starlette and uvicorn.

- ``GET /``: a page to drop, paste or pick an image, or turn on the camera; the top
  classes appear at once, beside the 28x28 image the model saw.
- ``POST /predict``: the image as multipart field ``file`` or as the raw body; answers
  ``{"predictions": [{"class", "probability"}...], "inference_ms", "model_input"}``.
- ``GET /healthz``: ``{"status": "ok", "model": ...}``.
- ``GET /docs`` and ``GET /openapi.json``: the API's OpenAPI description.

Every error is JSON of one shape, ``{"error": message, "status": code}``, and the
server keeps serving whatever it is sent. The limits below bound what one client, or
many, can make it hold: connections, header and body time, body bytes in memory, and
decodes in flight. It needs no TensorFlow, and binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn import Config, Server
from uvicorn.protocols.http.h11_impl import H11Protocol

from fmnist import __version__
from fmnist.config import CLASS_NAMES
from fmnist.inference import Classifier
from fmnist.preprocess import MAX_UPLOAD_BYTES, ImageError

LOGGER = logging.getLogger("fmnist.serve")

# Headroom over the image limit for the multipart envelope.
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
# Request bodies held in memory at once, over all clients; beyond it a request waits, then gets a 503.
BODY_BUDGET_BYTES = 64 * 1024 * 1024
# How long a request may wait for room in that budget before the 503.
QUEUE_WAIT_SECONDS = 2.0
# The request line and headers must arrive within this time, and their size stay under the next limit.
HEADER_TIMEOUT_SECONDS = 10.0
MAX_HEADER_BYTES = 16 * 1024
# The body must arrive within this time once the headers are in.
BODY_TIMEOUT_SECONDS = 10.0
# An idle keep-alive connection is closed after this time.
KEEP_ALIVE_SECONDS = 5
# Open connections, slow ones included; the next one gets a 503 and is closed.
MAX_CONNECTIONS = 1024


@dataclass(frozen=True)
class Limits:
    """What the service lets clients make it hold; the defaults are the constants above."""

    max_connections: int = MAX_CONNECTIONS
    header_timeout: float = HEADER_TIMEOUT_SECONDS
    body_timeout: float = BODY_TIMEOUT_SECONDS
    body_budget_bytes: int = BODY_BUDGET_BYTES
    queue_wait: float = QUEUE_WAIT_SECONDS
    # Decoding runs in parallel on this many threads; the interpreter itself runs one call at a time.
    decode_threads: int = max(1, min(4, os.cpu_count() or 1))


# Formats the decoder accepts, as request Content-Types (besides multipart and no type at all).
IMAGE_CONTENT_TYPES = {"image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif", "application/octet-stream"}

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(self), microphone=(), geolocation=()",
    "cache-control": "no-store",
}
# The page and its files, served from the package: URL path -> (file in assets/, media type).
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


class ApiError(Exception):
    """A request the service refuses: the status, a message naming the problem and the fix, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The one error shape: ``{"error": message, "status": code}``."""
    return Response(error_body(status, message), status_code=status, headers=headers, media_type="application/json")


def raw_error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response, for the protocol layer that answers before any request exists."""
    body = error_body(status, message)
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json"]
    head += [f"{name}: {value}" for name, value in SECURITY_HEADERS.items()]
    head += ["connection: close", f"content-length: {len(body)}"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


# -- The request body: bounded in size, time and total memory.


class BodyBudget:
    """Bytes of request bodies held at once, over all requests, counted as they arrive.

    A request takes its share chunk by chunk, so a client must really send bytes to hold memory
    (declaring a large Content-Length holds nothing). A chunk that does not fit waits up to
    ``wait_seconds`` for other requests to finish, then the request gets a 503 with Retry-After:
    memory stays bounded, and a burst queues briefly instead of failing.
    """

    def __init__(self, capacity: int = BODY_BUDGET_BYTES, wait_seconds: float = QUEUE_WAIT_SECONDS):
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self.used = 0
        self._changed: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[BodyBudget.Share]:
        """A share of the budget for one request; everything it took is given back on exit."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        share = BodyBudget.Share(self)
        try:
            yield share
        finally:
            if share.taken:
                async with self._changed:
                    self.used -= share.taken
                    self._changed.notify_all()

    class Share:
        def __init__(self, budget: BodyBudget):
            self.budget = budget
            self.taken = 0

        async def take(self, size: int) -> None:
            budget = self.budget
            size = min(size, budget.capacity)
            async with budget._changed:  # noqa: SLF001 - the budget's own lock.
                try:
                    await asyncio.wait_for(
                        budget._changed.wait_for(lambda: budget.used + size <= budget.capacity),  # noqa: SLF001
                        budget.wait_seconds,
                    )
                except TimeoutError:
                    raise ApiError(
                        503, "the server is busy: retry in a second.", {"Retry-After": "1", "Connection": "close"}
                    ) from None
                budget.used += size
                self.taken += size


def declared_length(request: Request) -> int | None:
    """The body's Content-Length (None when chunked); refuses a missing, bad or oversized one."""
    headers = request.headers
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            # RFC 9112 lets a server refuse this ambiguous framing, the stuff of request smuggling; refuse it.
            raise ApiError(
                400, "both Transfer-Encoding and Content-Length are set: send one of them.", {"Connection": "close"}
            )
        return None
    length = headers.get("content-length")
    if length is None:
        raise ApiError(411, "Content-Length is required: send the image as the body, or as multipart field 'file'.")
    if not length.isdigit():
        raise ApiError(400, f"bad Content-Length {length!r}: it must be a number of bytes.")
    if int(length) > MAX_BODY_BYTES:
        raise ApiError(
            413,
            f"upload of {int(length):,} bytes is over the {MAX_UPLOAD_BYTES:,}-byte limit: send a smaller image.",
            {"Connection": "close"},
        )
    return int(length)


async def read_body(
    request: Request, share: BodyBudget.Share, limit: int = MAX_BODY_BYTES, timeout: float = BODY_TIMEOUT_SECONDS
) -> bytearray:
    """The whole body, at most ``limit`` bytes, within ``timeout`` seconds (413 and 408 otherwise).

    Each chunk is counted against the body budget before it is kept, and the chunks go into one
    buffer, so the body is held once.
    """
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                if len(body) + len(chunk) > limit:
                    raise ApiError(
                        413,
                        f"upload is over the {MAX_UPLOAD_BYTES:,}-byte limit: send a smaller image.",
                        {"Connection": "close"},
                    )
                await share.take(len(chunk))
                body += chunk
    except TimeoutError:
        raise ApiError(
            408,
            f"the body did not arrive within {timeout:.0f} s ({len(body):,} bytes received): send it whole, "
            "and no more bytes than Content-Length says.",
            {"Connection": "close"},
        ) from None
    return body


def image_from_body(content_type: str, body: bytes) -> bytes:
    """The image bytes of a request: the multipart field ``file``, or the whole body."""
    media_type, options = parse_options_header(content_type)
    media_type = media_type.decode("latin-1").lower()
    if media_type == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary or len(boundary) > 70:
            # RFC 2046: a boundary has 1 to 70 characters.
            raise ApiError(400, "multipart body without a valid boundary: let the client library build the form.")
        return _multipart_file(boundary, body)
    if media_type and media_type not in IMAGE_CONTENT_TYPES:
        raise ApiError(
            415,
            f"Content-Type {media_type!r} is not accepted: send a PNG, JPEG, WebP, BMP or GIF image as the body "
            "(image/*), or as multipart/form-data field 'file'.",
        )
    return body


def _multipart_file(boundary: bytes, body: bytes) -> bytes:
    """The field ``file`` of a multipart body, parsed by python-multipart."""
    parts: list[dict[str, object]] = []
    header: dict[str, bytes] = {}

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": []})
        if len(parts) > 8:
            raise ApiError(400, "too many multipart fields: send one field, 'file'.")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header.pop("field", b"").lower()] = header.pop("value", b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as error:  # noqa: BLE001 - python-multipart raises several types for malformed bodies.
        raise ApiError(400, f"malformed multipart body ({error}): send the image as field 'file'.") from None
    for part in parts:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if options.get(b"name") == b"file":
            return b"".join(part["data"])
    raise ApiError(400, "multipart body has no field 'file': send the image as field 'file'.")


# -- The application.


@functools.cache
def asset(name: str) -> bytes | None:
    """A file of the page, read from the package once (None when the package lacks it)."""
    path = resources.files("fmnist").joinpath("assets", name)
    return path.read_bytes() if path.is_file() else None


def top_k_from(request: Request, default: int) -> int:
    value = request.query_params.get("top_k")
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= len(CLASS_NAMES):
        raise ApiError(422, f"top_k={value[:20]!r}: give a whole number from 1 to {len(CLASS_NAMES)}.")
    return int(value)


class Service:
    """What the routes share: the classifier, the limits, the pool that decodes and classifies."""

    def __init__(self, classifier: Classifier, top_k: int = 3, limits: Limits | None = None):
        self.classifier = classifier
        self.top_k = top_k
        self.limits = limits or Limits()
        self.body_budget = BodyBudget(self.limits.body_budget_bytes, self.limits.queue_wait)
        # Created on first use, inside the server's event loop: decode slots, and the threads that run them.
        self.limiter: anyio.CapacityLimiter | None = None
        self._threads: anyio.CapacityLimiter | None = None

    @property
    def threads(self) -> anyio.CapacityLimiter:
        if self._threads is None:
            self._threads = anyio.CapacityLimiter(self.limits.decode_threads)
        return self._threads

    def classify(self, content_type: str, body: bytes, top_k: int) -> dict[str, object]:
        prediction = self.classifier.classify(image_from_body(content_type, body), top_k=top_k)
        return prediction.as_dict(include_input=True)

    async def predict(self, request: Request) -> Response:
        top_k = top_k_from(request, self.top_k)
        declared_length(request)
        async with self.body_budget.hold() as share:
            body = await read_body(request, share, timeout=self.limits.body_timeout)
            if self.limiter is None:
                self.limiter = anyio.CapacityLimiter(self.limits.decode_threads)
            # A decode slot is waited for only so long: a burst of slow images answers 503, not a queue.
            try:
                with anyio.fail_after(self.limits.queue_wait):
                    await self.limiter.acquire()
            except TimeoutError:
                raise ApiError(
                    503, "the server is busy decoding other images: retry in a second.", {"Retry-After": "1"}
                ) from None
            try:
                answer = await anyio.to_thread.run_sync(
                    self.classify, request.headers.get("content-type", ""), body, top_k, limiter=self.threads
                )
            except ImageError as error:
                raise ApiError(422 if body else 400, str(error)) from None
            finally:
                self.limiter.release()
        return JSONResponse(answer)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.classifier.model_path.name})

    async def page(self, request: Request) -> Response:
        name, media_type = ASSETS[request.url.path]
        content = asset(name)
        if content is None:
            raise ApiError(404, f"{name} is missing from the installed package: reinstall fmnist.")
        return Response(content, media_type=media_type)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_spec())

    async def docs(self, request: Request) -> Response:
        return Response(docs_page(), media_type="text/html; charset=utf-8")


async def http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own errors (404, 405 with Allow) in the one error shape."""
    if error.status_code == 404:
        message = f"no such page: {request.url.path[:100]!r}; the page is /, the API is POST /predict (see /docs)."
    elif error.status_code == 405:
        allowed = error.headers.get("Allow", "")
        message = f"{request.method[:16]} is not allowed on {request.url.path[:100]!r}: use {allowed}."
    else:
        message = str(error.detail)
    return error_response(error.status_code, message, error.headers)


async def api_error(request: Request, error: ApiError) -> Response:
    return error_response(error.status, str(error), error.headers)


async def internal_error(request: Request, error: Exception) -> Response:
    """Anything unexpected: a 500 in the one shape (Starlette re-raises it to the ``Guard``, which logs it)."""
    return error_response(500, f"internal error ({type(error).__name__}); the server log has the details.")


class Guard:
    """The outermost layer: security headers on every response, one log line per failure, no tracebacks out.

    An ``ApiError`` becomes its JSON answer; anything else becomes a 500 in the same shape, with a
    traceback in the log only under ``--verbose``. A client that went away gets nothing and costs one
    line at most.
    """

    def __init__(self, app, verbose: bool = False):
        self.app = app
        self.verbose = verbose

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "status": 0, "error": b""}

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                state["started"], state["status"] = True, message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            elif state["status"] >= 400 and len(state["error"]) < 1024:
                state["error"] += message.get("body", b"")
            await send(message)

        started = time.perf_counter()
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        header_bytes += len(scope["method"]) + len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        try:
            if header_bytes > MAX_HEADER_BYTES:
                # h11 bounds headers that arrive in pieces; this bounds those that arrive at once.
                raise ApiError(
                    431,
                    f"the request's headers are {header_bytes:,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit.",
                    {"Connection": "close"},
                )
            await self.app(scope, receive, send_with_headers)
        except ApiError as error:
            if not state["started"]:
                await error_response(error.status, str(error), error.headers)(scope, receive, send_with_headers)
        except ClientDisconnect:
            LOGGER.info(
                "%s %r: the client went away before sending its body", scope["method"][:16], scope["path"][:200]
            )
            return
        except Exception as error:  # noqa: BLE001 - the service answers, whatever happens inside.
            LOGGER.error(
                "%s %r: internal error %s: %s",
                scope["method"][:16],
                scope["path"][:200],
                type(error).__name__,
                error,
                exc_info=self.verbose,
            )
            if not state["started"]:
                message = f"internal error ({type(error).__name__}); the server log has the details."
                await error_response(500, message)(scope, receive, send_with_headers)
            return
        if state["status"] >= 400:
            try:
                reason = json.loads(state["error"])["error"]
            except (ValueError, KeyError, TypeError):
                reason = ""
            client = scope.get("client") or ("-", 0)
            # repr() escapes control characters: a client cannot forge or colour log lines.
            LOGGER.warning(
                "%s %r %r -> %d in %.1f ms: %r",
                client[0],
                scope["method"][:16],
                scope["path"][:200],
                state["status"],
                (time.perf_counter() - started) * 1000,
                reason[:300],
            )


def create_app(classifier: Classifier, *, top_k: int = 3, verbose: bool = False, limits: Limits | None = None) -> Guard:
    """The ASGI application: the page, the JSON API and its documentation, behind the ``Guard``."""
    service = Service(classifier, top_k=top_k, limits=limits)
    routes = [Route(path, service.page, methods=["GET"]) for path in ASSETS]
    routes += [
        Route("/predict", service.predict, methods=["POST"]),
        Route("/healthz", service.healthz, methods=["GET"]),
        Route("/openapi.json", service.openapi, methods=["GET"]),
        Route("/docs", service.docs, methods=["GET"]),
    ]
    handlers = {HTTPException: http_error, ApiError: api_error, Exception: internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.service = service
    guarded = Guard(app, verbose=verbose)
    guarded.service = service
    return guarded


# -- The HTTP protocol: uvicorn's h11 protocol with a connection cap, a header timeout and JSON errors.


# How long a closing connection keeps reading (and discarding) what the client still sends.
LINGER_SECONDS = 2.0


class LingeringTransport:
    """An asyncio transport whose ``close`` stops sending first, then reads and discards for a moment.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the answer
    before the client reads it: a client that sends a whole oversized body before reading would see
    "connection reset" instead of its 413. Like a web server's lingering close, this keeps reading for
    ``LINGER_SECONDS`` after the answer, then closes.
    """

    def __init__(self, transport: asyncio.Transport, protocol: H11Protocol):
        self._transport = transport
        self._protocol = protocol
        self._lingering = False

    def close(self) -> None:
        transport = self._transport
        if self._lingering or transport.is_closing():
            return
        self._lingering = True
        self._protocol.rejected = True  # From now on, whatever arrives is discarded.
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def protocol_class(limits: Limits):
    """uvicorn's h11 protocol, with the limits uvicorn lacks.

    - More than ``max_connections`` open connections: the new one gets a 503 and is closed.
    - The first request's headers must arrive within ``header_timeout`` (uvicorn's keep-alive timer
      covers the requests after it): otherwise a 408, and the connection is closed.
    - Malformed framing and oversized headers get the JSON error shape with h11's status (400 or 431)
      instead of uvicorn's plain-text 400.
    """

    max_connections, header_timeout = limits.max_connections, limits.header_timeout

    class Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None
        rejected = False

        def connection_made(self, transport) -> None:
            super().connection_made(LingeringTransport(transport, self))
            if len(self.connections) > max_connections:
                LOGGER.info("%s -> 503: over %d connections", self._client(), max_connections)
                self._reject(503, "too many connections: retry in a second.")
                return
            self._arm_header_timer()

        def _reject(self, status: int, message: str) -> None:
            """Answer outside any request (raw bytes, as h11 allows no response here), then close lingering."""
            self._cancel_header_timer()
            self.transport.write(raw_error(status, message))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if not self.rejected:
                super().data_received(data)

        def _arm_header_timer(self) -> None:
            # uvicorn's keep-alive timer stops at the first byte; this one runs until a whole request head is in.
            self._cancel_header_timer()
            self.header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _header_timeout(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing() and not self.rejected:
                # At INFO: a slow-header flood would otherwise write a line per connection.
                LOGGER.info("%s -> 408: the request head did not arrive in time", self._client())
                self._reject(408, f"the request's headers did not arrive within {header_timeout:.0f} s.")

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            error = sys.exc_info()[1]
            # h11 hints 431 for an oversized head and 501 for a transfer coding it lacks: both are the
            # client's fault here, so anything but 431 is a 400.
            status = 431 if getattr(error, "error_status_hint", 400) == 431 else 400
            detail = str(error)[:200] if error is not None and str(error) else msg
            if status == 431:
                detail = f"the request's headers are over {MAX_HEADER_BYTES:,} bytes"
            message = f"bad HTTP request: {detail}."
            LOGGER.warning("%s -> %d: %r", self._client(), status, message)
            self._reject(status, message)

        def _client(self) -> str:
            return f"{self.client[0]}:{self.client[1]}" if self.client else "-"

    return Protocol


def uvicorn_config(
    app, host: str, port: int, *, limits: Limits | None = None, verbose: bool = False, **options
) -> Config:
    """uvicorn's settings for this service: the protocol above, no version in ``Server:``, quiet logs."""
    return Config(
        app,
        host=host,
        port=port,
        http=protocol_class(limits or Limits()),
        lifespan="off",
        server_header=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        backlog=2048,
        log_config=None,
        log_level=logging.INFO if verbose else logging.WARNING,
        access_log=verbose,
        **options,
    )


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record arrives, not when it was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _DropUvicornInvalidRequest(logging.Filter):
    """uvicorn's "Invalid HTTP request received." names neither client nor reason; the protocol logs its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


def configure_logging(verbose: bool) -> None:
    """One line per event on stderr; uvicorn's access log and our request lines only under ``verbose``."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("fmnist.serve", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_DropUvicornInvalidRequest())
    # Pillow warns on stderr about odd EXIF data and large headers, once per distinct message: a client
    # could fill the log (and the warnings registry) with them. The image's fate is decided, and logged, here.
    warnings.filterwarnings("ignore", module=r"PIL\.")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or an ``OSError`` that says what to change.

    The protocol number is given explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only
    on sockets whose ``proto`` is TCP, and without it every keep-alive answer waits ~40 ms for an ACK.
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as error:
        listener.close()
        reason = error.strerror or str(error)
        raise OSError(f"cannot listen on {host}:{port} ({reason}): choose another --port or --host.") from None
    return listener


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class BackgroundServer:
    """The service on a thread of this process, for tests and benchmarks: ``with BackgroundServer(c) as url``."""

    def __init__(
        self,
        classifier: Classifier,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: Limits | None = None,
        verbose: bool = False,
    ):
        self.socket = bind(host, port)
        port = self.socket.getsockname()[1]
        self.url = f"http://{host}:{port}/"
        self.app = create_app(classifier, verbose=verbose, limits=limits)
        self.server = Server(uvicorn_config(self.app, host, port, limits=limits, verbose=verbose))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start within 30 s.")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def serve(
    model_path=None,
    host: str = "127.0.0.1",
    port: int = 8000,
    verbose: bool = False,
    certfile: str | None = None,
    keyfile: str | None = None,
    limits: Limits | None = None,
) -> None:
    """Serve until Ctrl-C. Raises ``ModelError``, ``ImportError`` or ``OSError`` with a message to show."""
    started = time.perf_counter()
    classifier = Classifier(model_path)
    app = create_app(classifier, verbose=verbose, limits=limits)
    listener = bind(host, port)
    configure_logging(verbose)
    scheme = "https" if certfile else "http"
    shown_host = f"[{host}]" if ":" in host else host
    address = f"{scheme}://{shown_host}:{listener.getsockname()[1]}/"
    tls = {"ssl_certfile": certfile, "ssl_keyfile": keyfile} if certfile else {}
    config = uvicorn_config(app, host, listener.getsockname()[1], limits=limits, verbose=verbose, **tls)
    print(
        f"fmnist serve: {classifier.model_path.name} ready in {time.perf_counter() - started:.2f} s at {address} "
        "(Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    if not is_loopback(host) and not certfile:
        print(
            "fmnist serve: note: browsers allow the camera only over HTTPS or on localhost; other machines can "
            "upload images, and --certfile/--keyfile turn on HTTPS for the camera.",
            file=sys.stderr,
            flush=True,
        )
    try:
        Server(config).run(sockets=[listener])
    finally:
        listener.close()


# -- The API's description.


@functools.cache
def openapi_spec() -> dict[str, object]:
    """The OpenAPI 3.1 description of the JSON API, served at /openapi.json and rendered at /docs."""
    error = {"$ref": "#/components/schemas/Error"}

    def errors(*codes: int) -> dict[str, object]:
        return {
            str(code): {"description": HTTPStatus(code).phrase, "content": {"application/json": {"schema": error}}}
            for code in codes
        }

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fmnist classifier",
            "version": __version__,
            "description": "Classify a photo of one clothing article into the 10 Fashion-MNIST classes.",
        },
        "paths": {
            "/predict": {
                "post": {
                    "summary": "Classify one image",
                    "description": (
                        "Send a PNG, JPEG, WebP, BMP or GIF image, either as multipart/form-data field `file` or as "
                        f"the raw body, at most {MAX_UPLOAD_BYTES:,} bytes. The image is converted to grey, "
                        "inverted if its background is light, cropped to the article and fitted into 28x28."
                    ),
                    "parameters": [
                        {
                            "name": "top_k",
                            "in": "query",
                            "required": False,
                            "description": "how many classes to return, best first",
                            "schema": {"type": "integer", "minimum": 1, "maximum": len(CLASS_NAMES), "default": 3},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"file": {"type": "string", "format": "binary"}},
                                    "required": ["file"],
                                }
                            },
                            "image/*": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "The top classes, best first.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Prediction"}}},
                        },
                        **errors(400, 408, 411, 413, 415, 422, 431, 503),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {
                        "200": {
                            "description": "The service is up.",
                            "content": {
                                "application/json": {
                                    "example": {"status": "ok", "model": "fmnist_int8.tflite"},
                                }
                            },
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Prediction": {
                    "type": "object",
                    "properties": {
                        "predictions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "class": {"type": "string", "enum": list(CLASS_NAMES)},
                                    "probability": {"type": "number", "minimum": 0, "maximum": 1},
                                },
                            },
                        },
                        "inference_ms": {"type": "number", "description": "time in the model, in milliseconds"},
                        "model_input": {
                            "type": "object",
                            "description": "the 28x28 grey image the model saw: base64 of 784 bytes, row-major",
                            "properties": {
                                "width": {"type": "integer"},
                                "height": {"type": "integer"},
                                "encoding": {"type": "string"},
                                "data": {"type": "string"},
                            },
                        },
                    },
                    "example": {
                        "predictions": [
                            {"class": "Trouser", "probability": 0.9931},
                            {"class": "Dress", "probability": 0.0052},
                            {"class": "Bag", "probability": 0.0009},
                        ],
                        "inference_ms": 0.142,
                    },
                },
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {"type": "string", "description": "what went wrong and what to do"},
                        "status": {"type": "integer", "description": "the HTTP status, repeated"},
                    },
                    "required": ["error", "status"],
                    "example": {"error": "not an image (or an unsupported format): use PNG, ...", "status": 422},
                },
            }
        },
    }


@functools.cache
def docs_page() -> bytes:
    """The API description as a page a person can read, offline, from the same OpenAPI document."""
    spec = openapi_spec()
    sections = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            statuses = "".join(
                f"<li><code>{code}</code> {html.escape(response['description'])}</li>"
                for code, response in operation["responses"].items()
            )
            parameters = "".join(
                f"<li><code>{p['name']}</code> ({p['in']}): {html.escape(p['description'])}</li>"
                for p in operation.get("parameters", [])
            )
            sections.append(
                f"<section><h2><code>{method.upper()} {path}</code> · {html.escape(operation['summary'])}</h2>"
                f"<p>{html.escape(operation.get('description', ''))}</p>"
                + (f"<h3>Parameters</h3><ul>{parameters}</ul>" if parameters else "")
                + f"<h3>Responses</h3><ul>{statuses}</ul></section>"
            )
    schemas = json.dumps(spec["components"]["schemas"], indent=2)
    example = (
        "curl -F file=@shirt.jpg http://127.0.0.1:8000/predict\n"
        "curl --data-binary @shirt.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/predict?top_k=5'"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(spec['info']['title'])} · API</title>"
        "<link rel='icon' href='/favicon.svg'><link rel='stylesheet' href='/app.css'></head>"
        f"<body><main class='docs'><h1>{html.escape(spec['info']['title'])} API {spec['info']['version']}</h1>"
        f"<p>{html.escape(spec['info']['description'])} Machine-readable: <a href='/openapi.json'>openapi.json</a>."
        f"</p><h2>Examples</h2><pre>{html.escape(example)}</pre>{''.join(sections)}"
        f"<h2>Schemas</h2><pre>{html.escape(schemas)}</pre></main></body></html>"
    ).encode()
