"""The security-event webhook's receiver is trusted with events, not with the gateway's memory or
time: of its answer only the status counts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.config import EventsConfig
from gateway.events import ANSWER_BYTES, EventSink

CLAIMED = 64 << 20
SLACK = 8 << 20
"""What the sockets' buffers may hold beyond a limit when the reader hangs up."""


@contextlib.contextmanager
def _receiver(answer: Callable[[socket.socket], int]) -> Iterator[tuple[str, list[int]]]:
    """A webhook receiver on loopback that reads each request and answers it with ``answer``;
    what it got out before the gateway hung up, in bytes, goes into the list."""
    server = socket.create_server(("127.0.0.1", 0))
    sent: list[int] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length")))
                    while len(body) < length:
                        body += conn.recv(65536)
                    sent.append(answer(conn))

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/events", sent
    finally:
        server.close()


def _flood(conn: socket.socket) -> int:
    total = 0
    with contextlib.suppress(OSError):
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % CLAIMED)
        chunk = b" " * 65536
        while total < CLAIMED:
            conn.sendall(chunk)
            total += len(chunk)
    return total


def _trickle(conn: socket.socket) -> int:
    total = 0
    with contextlib.suppress(OSError):
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        for _ in range(50):
            time.sleep(0.2)
            conn.sendall(b" ")
            total += 1
    return total


def _sink(url: str, tmp_path: Path, timeout_s: float = 5.0) -> EventSink:
    (tmp_path / "webhook.key").write_bytes(b"k" * 32)
    return EventSink(EventsConfig(webhook_url=url, webhook_secret_file=str(tmp_path / "webhook.key"),
                                  timeout_s=timeout_s, retry_window_s=60))


async def _until(check: Callable[[], bool], seconds: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.anyio
async def test_an_endless_answer_is_not_read_past_its_limit(tmp_path: Path) -> None:
    with _receiver(_flood) as (url, sent):
        sink = _sink(url, tmp_path)
        await sink.start()
        try:
            sink.offer({"detector": "extraction", "model": "digits"})
            await _until(lambda: sink.counts["delivered"] == 1, 20)
            await _until(lambda: bool(sent), 10)
        finally:
            await sink.stop()
    assert sent[0] < ANSWER_BYTES + SLACK, f"{sent[0] >> 20} MiB of the receiver's answer read"


@pytest.mark.anyio
async def test_a_trickling_answer_fails_the_attempt_at_the_timeout(tmp_path: Path) -> None:
    """Each byte came within httpx's read timeout, so a receiver held delivery for as long as it liked."""
    with _receiver(_trickle) as (url, _):
        sink = _sink(url, tmp_path, timeout_s=1.0)
        await sink.start()
        try:
            sink.offer({"detector": "extraction", "model": "digits"})
            took = await _until(lambda: sink.counts["failed_attempts"] >= 1, 10)
            assert took < 3.0 and "took more than 1.0 s" in sink.last_error
        finally:
            await sink.stop(drain_s=0)
