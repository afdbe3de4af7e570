"""A local worker: its Unix socket, verified by the kernel's peer credentials, inferences as frames
over one connection, health over HTTP on the same socket; and the supervisor's blocking health check.

A local worker is verified on every new connection: the kernel's credentials of the socket's
listener (``SO_PEERCRED``: the process that called ``listen()``, which the worker does itself)
must be the process and user the supervisor started. Anything else listening on that path (a
compromised worker that swapped sockets, say) is refused before a byte of input is sent.
``UnixSocketTransport`` sends its inferences as frames (``gateway.workers.frames``: many at once,
the requests of one event-loop turn in one write) and keeps HTTP for health.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from gateway.offload import offload, text_elements
from gateway.workers.frames import (
    MAX_ANSWER_BYTES,
    NO_DEADLINE,
    PREFACE,
    FrameError,
    FrameReader,
    FrameTooLarge,
    FrameWriter,
    frame_head,
)
from gateway.workers.transport import (
    MAX_HEAD_BYTES,
    MAX_HEALTH_BYTES,
    AnswerTooLarge,
    HTTPTransport,
    P,
    PeerCredentials,
    WorkerConnectError,
    WorkerConnectionLost,
    WorkerImpostor,
    WorkerResponse,
    _Connection,
    _expire,
    answer_limit,
    log,
)
from gateway_client.protocol.codec import Chunk, Tensor, encode_tensor_parts

__all__ = ["UnixSocketTransport", "fetch_health", "peer_credentials"]


MAX_UNANSWERED = 65536
"""Requests whose answer limits are remembered after they were given up on (a late answer is
still read, within its own limit); past that, the oldest are forgotten and their answers read
within ``MAX_ANSWER_BYTES``."""


class _Framed(asyncio.Protocol):
    """The gateway's side of a connection that speaks frames (``gateway.workers.frames``)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.writer: FrameWriter | None = None
        self.reader = FrameReader(limit=MAX_ANSWER_BYTES, limit_of=self._limit_of)
        self.waiting: dict[int, asyncio.Future[WorkerResponse]] = {}
        self.limits: dict[int, int] = {}
        """Each request sent and not yet answered: the most bytes its answer may hold."""
        self.next_id = 0
        self.closed = False

    def _limit_of(self, request_id: int) -> int:
        return self.limits.get(request_id, MAX_ANSWER_BYTES)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.writer = FrameWriter(self.transport)  # type: ignore[arg-type]
        self.transport.write(PREFACE)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameTooLarge as exc:
            waiter = self.waiting.pop(exc.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(AnswerTooLarge(f"the worker's answer claimed more than its request allows: {exc}"))
            self._fail(WorkerConnectionLost(f"the worker answered another request beyond its limit: {exc}"))
            return
        except FrameError as exc:
            self._fail(WorkerConnectionLost(f"malformed answer from worker: {exc}"))
            return
        for request_id, status, header_length, payload in frames:
            self.limits.pop(request_id, None)
            waiter = self.waiting.pop(request_id, None)
            if waiter is None:  # timed out or cancelled meanwhile (or never asked: ignored)
                continue
            if not waiter.done():
                waiter.set_result(WorkerResponse(status, {}, payload, header_length))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(WorkerConnectionLost("worker closed the connection"))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        waiting, self.waiting = self.waiting, {}
        self.limits.clear()
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_exception(exc)

    async def exchange(self, parts: list[Chunk], header_length: int, timeout: float,
                       limit: int = MAX_ANSWER_BYTES) -> WorkerResponse:
        """Send the request; its answer, of at most ``limit`` bytes (``AnswerTooLarge``)."""
        assert self.writer is not None
        if self.closed:
            raise WorkerConnectionLost("worker closed the connection")
        loop = asyncio.get_running_loop()
        request_id = self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        waiter: asyncio.Future[WorkerResponse] = loop.create_future()
        self.waiting[request_id] = waiter
        if len(self.limits) >= MAX_UNANSWERED:
            del self.limits[next(iter(self.limits))]
        self.limits[request_id] = limit
        deadline_ms = min(int(timeout * 1000), NO_DEADLINE - 1)
        self.writer.write(frame_head(sum(map(len, parts)), request_id, deadline_ms, header_length), parts)
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self.waiting.pop(request_id, None)

    def close(self) -> None:
        self._fail(WorkerConnectionLost("the connection was closed"))


_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: Any) -> PeerCredentials:
    """The pid and uid of the process that listens on the other end of a Unix socket."""
    pid, uid, _gid = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
    return PeerCredentials(pid, uid)


class UnixSocketTransport(HTTPTransport):
    """A local worker on its Unix socket, verified by the kernel's peer credentials."""

    def __init__(self, path: str, max_connections: int = 256, credentials: PeerCredentials | None = None) -> None:
        super().__init__(path, max_connections)
        self.credentials = credentials
        self._channel: _Framed | None = None
        self._opening = asyncio.Lock()

    def expect(self, credentials: PeerCredentials | None) -> None:
        if credentials != self.credentials:
            self.credentials = credentials
            for conn in self._idle:  # made with the previous process: never reuse them
                conn.close()
            self._idle.clear()
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    async def _connect(self) -> _Connection:
        return await self._open(_Connection)

    async def _open(self, protocol: Callable[[], P]) -> P:
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await loop.create_unix_connection(protocol, self.address)
        except OSError as exc:
            raise WorkerConnectError(f"cannot connect to {self.address}: {exc.strerror or exc}") from None
        if self.credentials is not None:
            found = peer_credentials(transport.get_extra_info("socket"))
            if found != self.credentials:
                transport.abort()
                error = WorkerImpostor(
                    f"{self.address} is listened on by pid {found.pid} uid {found.uid}, not the worker the "
                    f"supervisor started (pid {self.credentials.pid} uid {self.credentials.uid})")
                log.error("SECURITY: %s; nothing was sent to it", error)
                raise error
        return conn

    async def infer(self, inputs: list[Tensor], timeout: float, limit: int | None = None) -> list[Tensor]:
        """Over the worker's framed connection (opened, and verified, on first use)."""
        channel = self._channel
        if channel is None or channel.closed:
            channel = await self._open_channel()
        body, header_length = await offload(text_elements(inputs), encode_tensor_parts, "inputs", inputs)
        response = await channel.exchange(body, header_length, timeout, answer_limit(limit))
        return await self._outputs(response)

    async def _open_channel(self) -> _Framed:
        async with self._opening:  # one connection, however many requests arrive meanwhile
            if self._channel is None or self._channel.closed:
                self._channel = await self._open(_Framed)
            return self._channel

    async def aclose(self) -> None:
        await super().aclose()
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def fetch_health(path: str, timeout: float = 2.0) -> dict[str, object] | None:
    """Blocking ``GET /health`` on a worker socket (for the supervisor's thread); None if unwell.

    ``OSError`` from making the socket itself (no file descriptor left, say) is raised: that is
    this process's trouble, not a sign that the worker is unwell.
    """
    import json

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: worker\r\nconnection: close\r\n\r\n")
        chunks, size = [], 0
        while chunk := sock.recv(65536):  # at most MAX_HEALTH_BYTES, within ``timeout`` in all
            chunks.append(chunk)
            size += len(chunk)
            left = deadline - time.monotonic()
            if size > MAX_HEALTH_BYTES + MAX_HEAD_BYTES or left <= 0:
                return None
            sock.settimeout(left)
    except OSError:
        return None
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
