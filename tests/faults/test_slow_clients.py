"""Connection timers: Slowloris and slow bodies cut off within the configured timeouts while probes
keep answering, and idle keep-alive connections kept past what client pools expect."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, client_context, start_gateway

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
SLOW_CLIENTS = 40


@pytest.fixture(scope="module")
def slow_gateway(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Gateway]:
    extra = f"header_timeout_s = {HEADER_TIMEOUT_S}\nbody_timeout_s = {BODY_TIMEOUT_S}\n"
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw-slow"), models_root, extra=extra)
    yield gw
    gw.stop()


async def _trickle(gw: Gateway, ctx: ssl.SSLContext, head: bytes, drip: list[bytes]) -> tuple[float, bytes]:
    """Send ``head``, then one piece of ``drip`` every 0.5 s; return when the server closes."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx, server_hostname="localhost")
    except (OSError, TimeoutError) as exc:  # reported by the caller's assertion, with the reason
        return 0.0, f"could not connect: {exc!r}".encode()
    start = time.monotonic()
    writer.write(head)
    received = b""
    try:
        for piece in drip:
            await writer.drain()
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.5)
            except TimeoutError:
                writer.write(piece)
                continue
            received += chunk
            if not chunk:
                break
        else:
            received += await asyncio.wait_for(reader.read(), 30)
    except (ConnectionError, ssl.SSLError) as exc:
        # drain() raises once the server has closed, even cleanly, with its answer still unread.
        received += await _rest(reader) or f"[{exc!r}]".encode()
    finally:
        writer.close()
    return time.monotonic() - start, received


async def _rest(reader: asyncio.StreamReader) -> bytes:
    """What the server sent that is still buffered, or b"" when the connection broke."""
    try:
        return await asyncio.wait_for(reader.read(), 1)
    except (ConnectionError, ssl.SSLError, TimeoutError):
        return b""


async def _probe_while(gw: Gateway, ctx: ssl.SSLContext, until: asyncio.Future[object]) -> list[float]:
    """Time /v2/health/ready on fresh connections until ``until`` is done."""
    took = []
    while not until.done():
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx, server_hostname="localhost")
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        took.append(time.monotonic() - start)
        await asyncio.sleep(0.2)
    return took


@pytest.mark.anyio
async def test_slowloris_headers_are_cut_off_and_probes_keep_answering(slow_gateway: Gateway) -> None:
    ctx = client_context(slow_gateway.pki)
    head = b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\n"
    drip = [b"X-Slow: %d\r\n" % i for i in range(60)]  # 30 s of headers if nobody stops it
    attack = asyncio.gather(*(_trickle(slow_gateway, ctx, head, drip) for _ in range(SLOW_CLIENTS)))
    probes = await _probe_while(slow_gateway, ctx, attack)
    results = await attack
    slow = [round(e, 2) for e, _ in results if e >= HEADER_TIMEOUT_S + 5]
    assert not slow, f"connections held past the header timeout: {slow}"  # closed by the gateway, not the drip
    answers = [r[:40] for _, r in results if not r.startswith(b"HTTP/1.1 408")]
    assert not answers, f"expected 408 on every slow connection, got {answers[:5]}"
    assert all(b"application/problem+json" in r for _, r in results)
    assert probes and max(probes) < 5  # answered throughout (a liveness bound, not a benchmark)


@pytest.mark.anyio
async def test_a_slow_body_is_cut_off(slow_gateway: Gateway) -> None:
    ctx = client_context(slow_gateway.pki)
    head = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Bearer " + slow_gateway.token("demo").encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    elapsed, received = await _trickle(slow_gateway, ctx, head, [b" "] * 60)
    assert elapsed < BODY_TIMEOUT_S + 3, elapsed
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"body did not arrive within" in received


@pytest.mark.anyio
async def test_an_idle_connection_that_sends_nothing_is_closed(slow_gateway: Gateway) -> None:
    ctx = client_context(slow_gateway.pki)
    elapsed, received = await _trickle(slow_gateway, ctx, b"", [b""] * 60)
    assert elapsed < HEADER_TIMEOUT_S + 3 and received.startswith(b"HTTP/1.1 408")


@pytest.mark.anyio
async def test_a_pooled_client_reusing_a_connection_at_its_pool_expiry_is_answered(slow_gateway: Gateway) -> None:
    """httpx keeps an idle connection 5 s; a gateway closing idle ones at 5 s too raced it: the
    client's request went into a connection closing under it ("server disconnected")."""
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [4.0] * 64}]}
    expiry = 5.0  # httpx's default keepalive_expiry
    rng = random.Random(19)

    async def idle_then_reuse(c: httpx.AsyncClient) -> int | str:
        async with c:
            assert (await c.post("/v2/models/digits/infer", json=body)).status_code == 200
            await asyncio.sleep(rng.uniform(expiry - 0.15, expiry - 0.01))
            try:
                return (await c.post("/v2/models/digits/infer", json=body)).status_code
            except httpx.TransportError as exc:
                return repr(exc)

    clients = [slow_gateway.async_client(limits=httpx.Limits(keepalive_expiry=expiry)) for _ in range(32)]
    outcomes = await asyncio.gather(*(idle_then_reuse(c) for c in clients))
    assert outcomes == [200] * len(clients), [o for o in outcomes if o != 200]
