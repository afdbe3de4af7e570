"""A lean HTTP/1.1 client for the worker's Unix socket: keep-alive pool, ``httptools`` parsing.

The gateway sends every inference through here, so its cost is per request. Measured against
one ``digits`` worker (``bench/transport.py``, two-core machine): httpx's pooled async transport
managed 879 requests/s from one task and 643 from 16, which would cap the whole gateway; this
client, 4,014 and 5,450. It speaks only the small subset the worker uses (``Content-Length``
bodies, keep-alive, one request at a time per connection).

Errors are split by whether the request may have reached the worker: ``WorkerConnectError``
(it did not; safe to send elsewhere) and ``WorkerConnectionLost`` (it may have).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httptools

__all__ = [
    "UnixHTTPClient",
    "WorkerConnectError",
    "WorkerConnectionLost",
    "WorkerResponse",
    "fetch_health",
]


class WorkerConnectError(ConnectionError):
    """The worker's socket did not accept a connection; nothing was sent."""


class WorkerConnectionLost(ConnectionError):
    """The connection broke after the request was (perhaps) sent."""


@dataclass(frozen=True, slots=True)
class WorkerResponse:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[WorkerResponse] | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
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
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(WorkerResponse(self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def exchange(self, message: list[bytes | memoryview], timeout: float | None) -> WorkerResponse:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.headers, self.body = {}, []
        self.waiter = waiter = loop.create_future()
        self.transport.writelines(message)
        # A timer on the future itself: cheaper per request than asyncio.timeout's task machinery.
        timer = loop.call_later(timeout, self._expire, waiter) if timeout else None
        try:
            response: WorkerResponse = await waiter
            return response
        finally:
            if timer is not None:
                timer.cancel()

    @staticmethod
    def _expire(waiter: asyncio.Future[WorkerResponse]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UnixHTTPClient:
    """HTTP/1.1 over one Unix socket, with up to ``max_connections`` kept alive."""

    def __init__(self, path: str, max_connections: int = 256) -> None:
        self.path = path
        self.max_connections = max_connections
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_unix_connection(_Connection, self.path)
        except OSError as exc:
            raise WorkerConnectError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        return conn

    async def request(
        self, method: str, target: str, body: list[bytes | memoryview] | bytes = b"",
        headers: dict[str, str] | None = None, timeout: float | None = None,
    ) -> WorkerResponse:
        """One exchange; ``body`` may be a list of parts, written in order without joining."""
        parts = [body] if isinstance(body, bytes) else body
        head = [f"{method} {target} HTTP/1.1\r\nhost: worker\r\ncontent-length: {sum(map(len, parts))}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in (headers or {}).items()]
        message = ["".join(head).encode("latin-1") + b"\r\n", *parts]
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                break
        else:
            conn = await self._connect()
        try:
            response = await conn.exchange(message, timeout)
        except BaseException:
            conn.close()  # a half-finished exchange poisons the connection
            raise
        if not conn.closed and len(self._idle) < self.max_connections:
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


def fetch_health(path: str, timeout: float = 2.0) -> dict[str, object] | None:
    """Blocking ``GET /health`` on a worker socket (for the supervisor's thread); None if unwell."""
    import json
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: worker\r\nconnection: close\r\n\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
