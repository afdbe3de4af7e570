"""How the gateway reaches one worker: the ``WorkerTransport`` interface, its errors, and HTTP.

A transport carries already-checked tensors to one worker and its outputs back, and asks the
worker for its health. ``HTTPTransport`` speaks binary tensors over HTTP/1.1 keep-alive (the
small subset the worker serves, parsed with ``httptools``: ``Content-Length`` bodies, one request
at a time per connection); a worker's answers are input, bounded before they are kept.
``gateway.workers.local.UnixSocketTransport`` reaches a local worker's socket and sends its
inferences as frames over one connection instead, keeping HTTP for health.
``gateway.workers.memory.InMemoryTransport`` runs a function in-process, for tests. A remote worker
is another ``HTTPTransport`` that connects over TCP with mutual TLS (``gateway.workers.remote``).

The gateway sends every inference through here, so its cost is per request. Measured against one
``digits`` worker (``bench/transport.py``, two-core machine): httpx's pooled async transport
managed 879 requests/s from one task and 643 from 16, which would cap the whole gateway; this
client, 4,014 and 5,450.

Errors are split by whether the request may have reached the worker: ``WorkerConnectError`` (it
did not; safe to send elsewhere) and ``WorkerConnectionLost`` (it may have); ``WorkerRefused`` is
the worker's own refusal (``status`` and its message).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, TypeVar

import httptools
import orjson

from gateway.offload import TEXT_WEIGHT, offload, text_elements
from gateway.workers.frames import (
    MAX_ANSWER_BYTES,
)
from gateway_client.protocol.codec import HEADER_LENGTH, Chunk, Tensor, decode_tensor_message, encode_tensor_parts

__all__ = [
    "ANSWERS_IN_FLIGHT_BYTES",
    "DEADLINE_HEADER",
    "MAX_HEAD_BYTES",
    "MAX_HEALTH_BYTES",
    "HTTPTransport",
    "PeerCredentials",
    "AnswerTooLarge",
    "WorkerConnectError",
    "WorkerConnectionLost",
    "WorkerImpostor",
    "WorkerRefused",
    "WorkerResponse",
    "WorkerTransport",
]


log = logging.getLogger("gateway.pool")

HEADER_KEY = HEADER_LENGTH.encode()
P = TypeVar("P", bound=asyncio.Protocol)

DEADLINE_HEADER = "gateway-deadline-ms"
"""What is left of the gateway's deadline when it sends an inference, in milliseconds: the worker
drops a request still queued when it passes (504) instead of running it for nobody."""
MAX_HEALTH_BYTES = 1 << 20
"""The most of a health answer read from a worker (its document is a few hundred bytes)."""
MAX_HEAD_BYTES = 64 * 1024
"""What an HTTP answer from a worker may add to its body's limit: its status line and headers."""
ANSWERS_IN_FLIGHT_BYTES = 1 << 30
"""The most bytes of unfinished answers one worker's (or worker host's) connections hold at once
by default (1 GiB; ``remote_workers.answers_in_flight_mb``): each answer is bounded on its own,
but up to ``max_inflight`` of them arrive together."""


class WorkerConnectError(ConnectionError):
    """The worker did not accept a connection; nothing was sent."""


class WorkerImpostor(WorkerConnectError):
    """Something other than the expected worker listens at the worker's address; nothing was sent."""


class WorkerConnectionLost(ConnectionError):
    """The connection broke after the request was (perhaps) sent."""


class AnswerTooLarge(WorkerConnectionLost):
    """The worker's answer claimed, or sent, more bytes than its request's answer can hold: it was
    cut off before it was kept, and the connection closed."""


class WorkerRefused(Exception):
    """The worker answered, with an error (``status`` 400 or 422: the input; else a failed run)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class WorkerResponse:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    header_length: int | None = None
    """A frame's JSON header length of its tensor message (over HTTP it is a header)."""


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The process and user a worker's socket must be listened on by."""

    pid: int
    uid: int


class WorkerTransport(ABC):
    """One worker, as the gateway's pool sees it."""

    address: str
    """Where the worker is, for logs."""

    @abstractmethod
    async def infer(self, inputs: list[Tensor], timeout: float, limit: int | None = None) -> list[Tensor]:
        """Run ``inputs``; raises the errors above, or ``TimeoutError`` past ``timeout`` seconds.
        ``limit``: the most bytes the answer can hold (``answer_bound``; else ``MAX_ANSWER_BYTES``)."""

    @abstractmethod
    async def health(self, timeout: float) -> dict[str, Any] | None:
        """The worker's health document, or None when it does not answer."""

    def expect(self, credentials: PeerCredentials | None) -> None:  # noqa: B027 (optional to override)
        """The identity the worker must prove from now on (a restarted worker is a new process)."""

    async def aclose(self) -> None:  # noqa: B027 (optional to override)
        """Close whatever the transport keeps open."""


def answer_limit(limit: int | None) -> int:
    """The most bytes of an answer the gateway reads: ``limit`` where the request bounds it."""
    return MAX_ANSWER_BYTES if limit is None else min(limit, MAX_ANSWER_BYTES)


def _expire(waiter: asyncio.Future[WorkerResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _InFlight:
    """Bytes of unfinished answers held by a transport's connections, against ``limit``."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.held = 0
        self.limit = limit


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[WorkerResponse] | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.closed = False
        self.limit = MAX_ANSWER_BYTES + MAX_HEAD_BYTES
        self.received = 0
        self.in_flight: _InFlight | None = None
        """The transport's answers in flight, which this connection's unfinished answer counts in."""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        in_flight = self.in_flight
        if in_flight is not None:
            in_flight.held += len(data)
        if self.received > self.limit:  # a worker's answer is input: bounded before it is kept
            self._fail(AnswerTooLarge(f"the worker's answer passed {self.limit} bytes"))
            return
        if in_flight is not None and in_flight.held > in_flight.limit:
            self._fail(AnswerTooLarge(f"the worker's answers in flight passed {in_flight.limit} bytes"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(WorkerConnectionLost(f"malformed response from worker: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(WorkerConnectionLost("worker closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self._release()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(WorkerResponse(self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def _release(self) -> None:
        """This connection's bytes out of the transport's answers in flight (once)."""
        if self.in_flight is not None:
            self.in_flight.held -= self.received
            self.in_flight = None

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        self._release()
        if self.transport is not None:
            self.transport.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def exchange(self, message: list[Chunk], timeout: float | None,
                       limit: int = MAX_ANSWER_BYTES, in_flight: _InFlight | None = None) -> WorkerResponse:
        """Send ``message``; its answer, of at most ``limit`` bytes of body (and its head), counted
        while it arrives in ``in_flight``."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.headers, self.body = {}, []
        self._release()
        self.limit, self.received, self.in_flight = limit + MAX_HEAD_BYTES, 0, in_flight
        self.waiter = waiter = loop.create_future()
        self.transport.writelines(message)
        # A timer on the future itself: cheaper per request than asyncio.timeout's task machinery.
        timer = loop.call_later(timeout, _expire, waiter) if timeout else None
        try:
            response: WorkerResponse = await waiter
            return response
        finally:
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        self.closed = True
        self._release()
        if self.transport is not None:
            self.transport.close()


class HTTPTransport(WorkerTransport):
    """Binary tensors over HTTP/1.1 with up to ``max_connections`` kept alive; subclasses connect.
    The answers arriving on them together are bounded (``ANSWERS_IN_FLIGHT_BYTES``) as each one is."""

    def __init__(self, address: str, max_connections: int = 256, answers_in_flight: int = 0) -> None:
        self.address = address
        self.max_connections = max_connections
        self._idle: list[_Connection] = []
        self._in_flight = _InFlight(answers_in_flight or ANSWERS_IN_FLIGHT_BYTES)

    @abstractmethod
    async def _connect(self) -> _Connection:
        """A new connection to the worker, verified; ``WorkerConnectError`` if none can be made."""

    async def request(
        self, method: str, target: str, body: list[Chunk] | bytes = b"",
        headers: dict[str, str] | None = None, timeout: float | None = None, limit: int = MAX_ANSWER_BYTES,
    ) -> WorkerResponse:
        """One exchange; ``body`` may be a list of parts, written in order without joining; an
        answer of more than ``limit`` bytes closes the connection (``WorkerConnectionLost``)."""
        parts = [body] if isinstance(body, bytes) else body
        head = [f"{method} {target} HTTP/1.1\r\nhost: worker\r\ncontent-length: {sum(map(len, parts))}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in (headers or {}).items()]
        message: list[Chunk] = ["".join(head).encode("latin-1") + b"\r\n", *parts]
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                break
        else:
            conn = await self._connect()
        try:
            response = await conn.exchange(message, timeout, limit, self._in_flight)
        except BaseException:
            conn.close()  # a half-finished exchange poisons the connection
            raise
        if not conn.closed and len(self._idle) < self.max_connections:
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def infer(self, inputs: list[Tensor], timeout: float, limit: int | None = None) -> list[Tensor]:
        body, header_length = await offload(text_elements(inputs), encode_tensor_parts, "inputs", inputs)
        response = await self.request("POST", "/infer", body, {HEADER_LENGTH: str(header_length),
                                                                DEADLINE_HEADER: str(int(timeout * 1000))},
                                      timeout=timeout, limit=answer_limit(limit))
        return await self._outputs(response)

    async def _outputs(self, response: WorkerResponse) -> list[Tensor]:
        if response.status != 200:
            raise WorkerRefused(response.status, _error_text(response))
        try:
            length = response.header_length
            if length is None:
                length = int(response.headers[HEADER_KEY])
            # BYTES outputs are decoded element by element: a large answer holding them, in a thread
            text = b'"BYTES"' in response.body[:length]
            work = (len(response.body) - length) * TEXT_WEIGHT // 4 if text else 0
            return await offload(work, decode_tensor_message, response.body, length, "outputs")
        except (KeyError, ValueError) as exc:
            raise WorkerConnectionLost(f"malformed answer from worker {self.address}: {exc}") from None

    async def health(self, timeout: float) -> dict[str, Any] | None:
        try:
            response = await self.request("GET", "/health", timeout=timeout, limit=MAX_HEALTH_BYTES)
            doc = orjson.loads(response.body) if response.status == 200 else None
        except (ConnectionError, TimeoutError, orjson.JSONDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _error_text(response: WorkerResponse) -> str:
    try:
        return str(orjson.loads(response.body).get("error", ""))[:500]
    except (orjson.JSONDecodeError, AttributeError):
        return f"status {response.status}"
