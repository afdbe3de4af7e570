"""uvicorn's httptools protocol tuned for tensors, for the gateway and its workers.

Two changes for speed, each measured with ``wrk`` over mTLS on this project's two-core machine:

* the response head and body leave in one write (``CoalescingTransport``): one TLS record and
  one system call instead of two; ``digits`` at 16 clients went from about 3,500 to 4,800
  requests/s in back-to-back runs;
* a larger request-body buffer, below.

uvicorn pauses reading once 64 KiB of body is buffered and resumes on each ``receive()``, so a
tensor body of several hundred KiB costs a dozen pause/wake round trips per hop. Both the gateway
and the workers read the whole body at once (bounded by ``server.max_body_bytes``), so reading
continues until ``BODY_HIGH_WATER`` is buffered before back-pressure applies. Measured with
``wrk`` on a 588 KiB binary tensor over mTLS (a model that costs ~0.1 ms): p50 at one client
from 1.8 ms to 1.45 ms, and +13% requests/s at 16 clients. uvicorn is pinned for this subclass.

And one bound. With HTTP/1.1 pipelining, uvicorn parses every request a read brings, queues those
that must wait for the one being answered, and goes back to reading after each answer (and at
each ``receive()``) however many are queued: a client that sent requests faster than they were
answered, or read none of its answers, had all it sent parsed and held (one connection grew the
gateway by ~570 MiB with 200,000 small requests). Here at most ``MAX_PIPELINED`` requests, and
``MAX_PIPELINED_BYTES`` of what came after the request being answered, wait parsed; what the
client sent after them stays unparsed (``held``) and reading stays paused until answers catch up,
so the rest waits in the sockets' buffers. Requests are parsed in pieces (a head ``HEAD_PIECE``
bytes at a time, a body of declared length at once), so that one read cannot queue thousands
before the bound is looked at.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["BODY_HIGH_WATER", "HEAD_PIECE", "MAX_PIPELINED", "MAX_PIPELINED_BYTES", "BufferedBodyProtocol", "CoalescingTransport",
           "freeze_startup_heap"]

BODY_HIGH_WATER = 1024 * 1024
MAX_PIPELINED = 32
"""Requests parsed and waiting on one connection while an earlier one is answered."""
MAX_PIPELINED_BYTES = 64 * 1024
"""... and bytes parsed for them (heads and bodies), until none waits: 32 heads of 30 KB held
~1 MiB per connection."""
HEAD_PIECE = 4096
"""What the parser is given at a time outside a body of declared length: at most ~150 of the
smallest requests (27 bytes) can be parsed past ``MAX_PIPELINED`` before it is looked at again."""


class CoalescingTransport:
    """Joins the writes made in one event-loop step into one ``write``.

    uvicorn writes a response's head and body separately; over TLS each write is its own record
    and system call. Writes are held until the end of the current loop step (``call_soon``), so a
    small response goes out as one record. Everything else is the wrapped transport's.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class PipelineFlow(FlowControl):
    """uvicorn's flow control, except that reading is not resumed while the connection is
    backlogged: as many requests (or bytes) waiting as it may have, or what came after them held."""

    def __init__(self, transport: asyncio.Transport, protocol: BufferedBodyProtocol) -> None:
        super().__init__(transport)
        self.protocol = protocol

    def resume_reading(self) -> None:
        if self.read_paused and not self.protocol.backlogged():  # asked only when paused: cheap
            super().resume_reading()


class BufferedBodyProtocol(HttpToolsProtocol):
    held = b""
    """What the client sent after the requests waiting, not yet parsed."""
    _body_left = 0  # bytes of the current body not yet parsed, where its length was declared
    _ahead = 0  # bytes parsed while requests wait, since none did

    def backlogged(self) -> bool:
        return bool(self.held) or self._waiting_full()

    def _waiting_full(self) -> bool:
        return len(self.pipeline) >= MAX_PIPELINED or self._ahead >= MAX_PIPELINED_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport))  # type: ignore[arg-type]
        self.flow = PipelineFlow(self.transport, self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.held = b""
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.held:  # reading is paused; this was already on its way
            self.held += data
            return
        while data:
            if self.pipeline and self._waiting_full():
                self.held = data
                self.flow.pause_reading()
                self.hold_started()
                return
            size = self._body_left if self._body_left > 0 else HEAD_PIECE
            piece = data[:size]
            self.feed(piece)
            if self.pipeline:
                self._ahead += len(piece)
            data = data[size:]

    def feed(self, piece: bytes) -> None:
        """Give the parser one piece of what the client sent."""
        super().data_received(piece)

    def hold_started(self) -> None:
        """What the client sent next waits unparsed until earlier requests are answered."""

    def hold_ended(self) -> None:
        """Everything held was parsed, and reading goes on."""

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next request waiting, if any
        if not self.pipeline:
            self._ahead = 0
        if self.held and not self._waiting_full():
            self.loop.call_soon(self._parse_held)

    def _parse_held(self) -> None:
        data, self.held = self.held, b""
        if data and not self.transport.is_closing():
            self.data_received(data)
            if not self.held:
                self.flow.resume_reading()
                self.hold_ended()

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 14 and name.lower() == b"content-length":  # (never a trailer field: llhttp refuses it)
            self.declare_length(value)
        super().on_header(name, value)

    def declare_length(self, value: bytes) -> None:
        self._body_left = int(value) if value.isdigit() else 0

    def on_body(self, body: bytes) -> None:
        self._body_left -= len(body)  # 0 at the body's end; a chunked one goes below 0
        if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
            return
        self.cycle.body += body
        if len(self.cycle.body) > BODY_HIGH_WATER:
            self.flow.pause_reading()
        self.cycle.message_event.set()


def freeze_startup_heap() -> None:
    """Move everything start-up allocated (the libraries, the model table, the keys: ~100,000
    objects) out of the garbage collector's sight, once start-up is done.

    A full collection walks every tracked object; with the start-up heap in it one took 64 ms on
    the two-core machine, and under load it ran every few seconds, so one request in a hundred
    waited for it (p99 at 16 clients ~90 ms against a p50 of 7 ms). ``gc.freeze`` is the CPython
    documented remedy: frozen objects are never collected (they live as long as the process) and
    what requests allocate is collected as before.
    """
    gc.collect()
    gc.freeze()
