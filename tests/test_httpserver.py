"""The coalescing transport: writes in one loop step leave as one, in order, and close flushes;
pipelined requests are parsed no further ahead of their answers than the bounds allow, and all
are answered in order; the start-up heap is out of the collector's way once a serving process has
started."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from pathlib import Path

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.app import create_app
from gateway.config import load_config
from gateway.httpserver import (
    HEAD_PIECE,
    MAX_PIPELINED,
    MAX_PIPELINED_BYTES,
    BufferedBodyProtocol,
    CoalescingTransport,
)
from gateway.workers.pool import WorkerPool

pytestmark = pytest.mark.anyio


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

        self.reading = True

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def test_writes_in_one_step_are_joined_in_order() -> None:
    raw = Recorder()
    t = CoalescingTransport(raw)
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"body")
    assert raw.writes == []
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.write(b"next")
    await asyncio.sleep(0)
    assert raw.writes[-1] == b"next"


async def test_close_flushes_before_closing_and_attributes_delegate() -> None:
    raw = Recorder()
    t = CoalescingTransport(raw)
    t.write(b"last words")
    t.close()
    assert raw.writes == [b"last words"] and raw.closed
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)
    await asyncio.sleep(0)
    assert raw.writes == [b"last words"]  # the scheduled flush finds nothing left


class HeldApp:
    """Answers each request with its path, once ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        body = b""
        while True:
            message = await receive()  # type: ignore[operator]
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await self.release.wait()
        path = str(scope["path"]).encode()
        await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                    "headers": [(b"content-length", str(len(path)).encode())]})
        await send({"type": "http.response.body", "body": path})  # type: ignore[operator]


def _connection(app: HeldApp) -> tuple[BufferedBodyProtocol, Recorder]:
    config = Config(app=app, log_level="warning")
    config.load()
    protocol = BufferedBodyProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Recorder()
    protocol.connection_made(transport)
    return protocol, transport


@pytest.mark.parametrize("count,pad,body", [(200, 0, b""), (40, 30_000, b""), (60, 0, b"x" * 5000)],
                         ids=["small", "large-heads", "with-bodies"])
async def test_pipelined_requests_wait_unparsed_past_the_bounds_and_are_all_answered_in_order(
        count: int, pad: int, body: bytes) -> None:
    """Sent in one piece, while the first waits for its answer: ``MAX_PIPELINED`` requests, or
    ``MAX_PIPELINED_BYTES`` of them, are parsed (and what the last piece given to the parser held);
    the rest is held and reading paused. Once answers flow, every request is answered, in the
    order sent, with its own body."""
    app = HeldApp()
    protocol, transport = _connection(app)
    one = (b"POST /r%d HTTP/1.1\r\nHost: h\r\nx-pad: " + b"p" * pad
           + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    protocol.data_received(b"".join(one % i for i in range(count)))
    await asyncio.sleep(0.01)
    size = len(one % 0)
    waiting = len(protocol.pipeline)
    assert 1 <= waiting <= MAX_PIPELINED + HEAD_PIECE // size + 1
    assert (waiting - 1) * size <= MAX_PIPELINED_BYTES + max(HEAD_PIECE, len(body))
    assert protocol.held and not transport.reading
    app.release.set()
    for _ in range(200):
        await asyncio.sleep(0.005)
        if len(b"".join(transport.writes).split(b"HTTP/1.1 200")) == count + 1:
            break
    answers = b"".join(transport.writes)
    assert [int(a.rsplit(b"/r", 1)[1]) for a in answers.split(b"HTTP/1.1 200")[1:]] == list(range(count))
    assert app.bodies == [body] * count
    assert transport.reading and not protocol.held


async def test_a_started_app_has_frozen_its_startup_heap(pki: Path, tmp_path: Path) -> None:
    """Full collections walk only what requests allocate (a 64 ms pause per collection otherwise)."""
    config = load_config(pki / "gateway.toml")
    config = dataclasses.replace(config, audit=dataclasses.replace(config.audit, enabled=False))
    app = create_app(config, str(tmp_path), pool=WorkerPool.of(config, {}))
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
