"""Inference between the gateway and a local worker: many requests at once over one connection.

Over HTTP/1.1 each inference needs a connection of its own for as long as it runs (the worker
answers one request at a time per connection, or its batches could not form), so each one costs
a system call to send, a wake-up and a read on each side, and a parse of an HTTP head. Here a
connection opens with ``PREFACE`` and then carries frames in both directions; every frame is a
16-byte head (four little-endian unsigned 32-bit fields) and a payload:

* request (gateway to worker): payload length, request id, milliseconds left of the gateway's
  deadline (``NO_DEADLINE``: none), the length of the payload's JSON header; the payload is a binary
  tensor message of the inputs (``encode_tensor_parts``);
* answer (worker to gateway): payload length, the request's id, a status as HTTP's (200: the
  payload is a tensor message of the outputs; 400 or 422: the input; 504: the deadline passed
  while it queued; 500: the run failed, with ``{"error": ...}`` as payload), the JSON header length.

Answers come in any order (each names its request). Both sides gather the frames of one turn of
their event loop into one write: the requests of sixteen clients that arrive together leave in
one system call, and the answers of a batch come back in one. Measured in ``bench/RESULTS.md``.

The worker also keeps serving HTTP on the same socket (``GET /health``, ``POST /infer``): it tells
them apart by the preface. Remote worker hosts are reached over HTTP (``remote``). A worker is
verified as before, by its socket's peer credentials when the connection opens, and an answer is
never trusted further than a local worker's HTTP answer was: its length is bounded
(``MAX_ANSWER_BYTES``, or less where the model's manifest bounds the request's answer), its id
must be one still waited for, and its tensors are decoded and checked as any.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from gateway_client.protocol.codec import Chunk

__all__ = ["HEAD", "MAX_ANSWER_BYTES", "NO_DEADLINE", "PREFACE", "FrameError", "FrameReader", "FrameTooLarge",
           "FrameWriter", "frame_head"]

PREFACE = b"TENSORS/1\r\n"
"""What a connection that speaks frames sends first (never the start of an HTTP request)."""

HEAD = struct.Struct("<IIII")
NO_DEADLINE = 0xFFFFFFFF
MAX_ANSWER_BYTES = 1 << 28
"""The largest answer payload the gateway reads from a worker (256 MiB): a longer one closes the
connection before any of it is buffered, and fails every request the connection carried."""


class FrameError(ValueError):
    """The bytes on a connection are not frames: the connection cannot be trusted further."""


class FrameTooLarge(FrameError):
    """A frame longer than its request's limit."""

    def __init__(self, request_id: int, length: int, limit: int) -> None:
        super().__init__(f"a frame of {length} bytes (at most {limit})")
        self.request_id = request_id


def frame_head(length: int, request_id: int, field: int, header_length: int) -> bytes:
    return HEAD.pack(length, request_id, field, header_length)


class FrameReader:
    """Frames out of a byte stream, whatever pieces it arrives in; payloads of more than
    ``limit`` bytes (or than ``limit_of(request id)``, where given) raise ``FrameTooLarge`` before
    any of it is buffered."""

    def __init__(self, limit: int, limit_of: Callable[[int], int] | None = None) -> None:
        self.limit = limit
        self.limit_of = limit_of
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        """(request id, field, header length, payload) of each frame that ``data`` completes."""
        if self._buffer:
            self._buffer += data
            view = memoryview(self._buffer)
        else:
            view = memoryview(data)
        frames = []
        offset, size = 0, len(view)
        try:
            while size - offset >= HEAD.size:
                length, request_id, field, header_length = HEAD.unpack_from(view, offset)
                limit = self.limit if self.limit_of is None else min(self.limit, self.limit_of(request_id))
                if length > limit:
                    raise FrameTooLarge(request_id, length, limit)
                end = offset + HEAD.size + length
                if end > size:
                    break
                frames.append((request_id, field, header_length, bytes(view[offset + HEAD.size:end])))
                offset = end
        finally:
            view.release()
        if self._buffer:
            del self._buffer[:offset]
        elif offset < size:
            self._buffer += data[offset:]
        return frames


class FrameWriter:
    """Frames written in one turn of the event loop leave in one ``writelines`` at its end."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._pending: list[Chunk] = []
        self._loop = asyncio.get_running_loop()

    def write(self, head: bytes, payload: list[Chunk]) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(head)
        self._pending.extend(payload)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self.transport.is_closing():
            self.transport.writelines(pending)
