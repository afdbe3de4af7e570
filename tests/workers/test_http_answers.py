"""A worker's HTTP answers (health documents; inferences from a worker host) are input: one that
never ends, or ends too late, is cut off before it is kept, in the serving process and in the
supervisor's health checks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.workers.transport import MAX_HEALTH_BYTES, UnixSocketTransport, WorkerConnectionLost, fetch_health

CLAIMED = 64 << 20
SLACK = 8 << 20
"""What the sockets' buffers may hold beyond a limit when the reader hangs up."""


@contextlib.contextmanager
def _worker(tmp_path: Path, answer: Callable[[socket.socket], int]) -> Iterator[tuple[str, list[int]]]:
    """A Unix socket that answers each connection's request with ``answer``; what it got out to
    each before the other side hung up, in bytes, is in the list."""
    path = str(tmp_path / "w.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    sent: list[int] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)
                    sent.append(answer(conn))

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield path, sent
    finally:
        server.close()


def _flood(conn: socket.socket) -> int:
    """An answer that claims 64 MiB and sends them as fast as they are read."""
    total = 0
    with contextlib.suppress(OSError):
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % CLAIMED)
        chunk = b" " * 65536
        while total < CLAIMED:
            conn.sendall(chunk)
            total += len(chunk)
    return total


def _drip(conn: socket.socket) -> int:
    """An answer that never stops coming, a byte at a time, for 8 seconds."""
    total = 0
    with contextlib.suppress(OSError):
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        for _ in range(40):
            time.sleep(0.2)
            conn.sendall(b" ")
            total += 1
    return total


def _sent(sent: list[int]) -> int:
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent, "the worker never finished answering"
    return sent[0]


@pytest.mark.anyio
async def test_an_endless_health_answer_is_cut_off_at_its_limit(tmp_path: Path) -> None:
    with _worker(tmp_path, _flood) as (path, sent):
        worker = UnixSocketTransport(path)
        try:
            assert await worker.health(timeout=10) is None
        finally:
            await worker.aclose()
        assert _sent(sent) < MAX_HEALTH_BYTES + SLACK, f"{sent[0] >> 20} MiB of a health answer read"


@pytest.mark.anyio
async def test_an_answer_past_its_limit_closes_the_connection(tmp_path: Path) -> None:
    with _worker(tmp_path, _flood) as (path, sent):
        worker = UnixSocketTransport(path)
        try:
            with pytest.raises(WorkerConnectionLost, match="passed"):
                await worker.request("POST", "/infer", b"{}", timeout=10, limit=1 << 20)
        finally:
            await worker.aclose()
        assert _sent(sent) < (1 << 20) + SLACK


def test_the_supervisors_health_check_reads_at_most_its_limit(tmp_path: Path) -> None:
    with _worker(tmp_path, _flood) as (path, sent):
        assert fetch_health(path, timeout=10) is None
        assert _sent(sent) < MAX_HEALTH_BYTES + SLACK, f"{sent[0] >> 20} MiB of a health answer read"


def test_the_supervisors_health_check_gives_up_at_its_timeout_however_the_bytes_trickle(tmp_path: Path) -> None:
    """Each byte came within the socket's timeout, so a worker could hold the check (and the
    supervisor's thread that runs every worker's) for as long as it liked."""
    with _worker(tmp_path, _drip) as (path, _):
        started = time.monotonic()
        assert fetch_health(path, timeout=1.0) is None
        assert time.monotonic() - started < 2.5
