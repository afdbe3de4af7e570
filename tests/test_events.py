"""The security-event webhook's receiver is trusted with events, not with the gateway's memory or
time: of its answer only the status counts."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import EventsConfig
from gateway.events import ANSWER_BYTES, EventSink
from tests.hostile_peers import SLACK, answering, first_sent, flood, trickle


def _sink(server: socket.socket, tmp_path: Path, timeout_s: float = 5.0) -> EventSink:
    (tmp_path / "webhook.key").write_bytes(b"k" * 32)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/events"
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
    server = socket.create_server(("127.0.0.1", 0))
    with answering(server, flood) as sent:
        sink = _sink(server, tmp_path)
        await sink.start()
        try:
            sink.offer({"detector": "extraction", "model": "digits"})
            await _until(lambda: sink.counts["delivered"] == 1, 20)
        finally:
            await sink.stop()
        assert first_sent(sent) < ANSWER_BYTES + SLACK, f"{sent[0] >> 20} MiB of the receiver's answer read"


@pytest.mark.anyio
async def test_a_trickling_answer_fails_the_attempt_at_the_timeout(tmp_path: Path) -> None:
    """Each byte came within httpx's read timeout, so a receiver held delivery for as long as it liked."""
    server = socket.create_server(("127.0.0.1", 0))
    with answering(server, trickle):
        sink = _sink(server, tmp_path, timeout_s=1.0)
        await sink.start()
        try:
            sink.offer({"detector": "extraction", "model": "digits"})
            took = await _until(lambda: sink.counts["failed_attempts"] >= 1, 10)
            assert took < 3.0 and "took more than 1.0 s" in sink.last_error
        finally:
            await sink.stop(drain_s=0)
