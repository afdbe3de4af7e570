"""The coalescing transport: writes in one loop step leave as one, in order, and close flushes;
the start-up heap is out of the collector's way once a serving process has started."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.config import load_config
from gateway.httpserver import CoalescingTransport
from gateway.workers.pool import WorkerPool

pytestmark = pytest.mark.anyio


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

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
