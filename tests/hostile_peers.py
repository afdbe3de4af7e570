"""Peers that answer the gateway as an attacker would (a worker, a webhook receiver): an answer
without end, or one that trickles, served from a listening socket in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

CLAIMED = 64 << 20
SLACK = 8 << 20
"""What the sockets' buffers may hold beyond a limit when the reader hangs up."""


def flood(conn: socket.socket) -> int:
    """An answer that claims 64 MiB and sends them as fast as they are read; the bytes got out."""
    total = 0
    with contextlib.suppress(OSError):
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % CLAIMED)
        chunk = b" " * 65536
        while total < CLAIMED:
            conn.sendall(chunk)
            total += len(chunk)
    return total


def trickle(conn: socket.socket) -> int:
    """An answer that keeps coming, a byte every 0.2 s, for 10 seconds."""
    total = 0
    with contextlib.suppress(OSError):
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        for _ in range(50):
            time.sleep(0.2)
            conn.sendall(b" ")
            total += 1
    return total


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)


@contextlib.contextmanager
def answering(server: socket.socket, answer: Callable[[socket.socket], int],
              together: bool = False) -> Iterator[list[int]]:
    """Each request to the listening ``server`` answered with ``answer`` (``together``: each
    connection in a thread of its own, so their answers arrive at once); what it got out to each
    connection before the other side hung up, in bytes, goes into the list."""
    sent: list[int] = []

    def one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            _read_request(conn)
            sent.append(answer(conn))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                if together:
                    threading.Thread(target=one, args=(conn,), daemon=True).start()
                else:
                    one(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield sent
    finally:
        server.close()


def first_sent(sent: list[int]) -> int:
    """The bytes the first answer got out, once it has ended."""
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent, "the peer never finished answering"
    return sent[0]
