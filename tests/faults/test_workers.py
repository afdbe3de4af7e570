"""Worker faults under load: kill -9, a hung worker, and 1,000 concurrent unique inputs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.workers.local import fetch_health
from tests.conftest import Gateway, onnx_reference, start_gateway
from tests.test_metrics import value

INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def gw2(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Gateway]:
    """A gateway whose digits model has two workers and a short deadline."""
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw2"), models_root,
                       digits_workers=2, timeout_s=4.0)
    yield gw
    gw.stop()


def _payload(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def _worker_health(gw: Gateway, index: int) -> dict[str, object] | None:
    return fetch_health(str(gw.runtime_dir() / f"digits-{index}.sock"), timeout=1.0)


async def _load(gw: Gateway, seconds: float, clients: int) -> list[tuple[float, int, str | None]]:
    """``clients`` loops posting for ``seconds``; returns (time, status, Retry-After) per answer."""
    x = np.full((1, 64), 8.0, np.float32)
    results: list[tuple[float, int, str | None]] = []
    stop = time.monotonic() + seconds

    async def loop(c: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            r = await c.post(INFER, json=_payload(x))
            results.append((time.monotonic(), r.status_code, r.headers.get("retry-after")))

    async with gw.async_client(limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(loop(c) for _ in range(clients)))
    return results


@pytest.mark.anyio
async def test_kill_9_of_a_worker_under_load(gw2: Gateway) -> None:
    victim_pid = int(_worker_health(gw2, 0)["pid"])  # type: ignore[index, arg-type]
    load = asyncio.create_task(_load(gw2, seconds=6.0, clients=16))
    await asyncio.sleep(1.5)
    killed_at = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)
    results = await load

    statuses = {s for _, s, _ in results}
    assert statuses <= {200, 503}, statuses
    failures = [(t, s, ra) for t, s, ra in results if s != 200]
    assert all(ra is not None and int(ra) >= 1 for _, _, ra in failures)  # 503 always says when to retry
    after = [s for t, s, _ in results if t > killed_at + 0.5]
    assert after.count(200) > 50, "the surviving worker kept answering"
    assert gw2.proc.poll() is None, "the gateway stayed up"

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = _worker_health(gw2, 0)
        if health and health["pid"] != victim_pid and health["ready"]:
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the killed worker was not back within 10 s")
    async with gw2.async_client() as c:  # and the gateway routes to it again
        await asyncio.sleep(1.0)
        for _ in range(20):
            assert (await c.post(INFER, json=_payload(np.full((1, 64), 3.0, np.float32)))).status_code == 200
    with gw2.client("admin") as admin:  # and an alert on restarts can see it
        scrape = admin.get("/metrics").text
    assert value(scrape, "gateway_worker_restarts_total", model="digits", worker="0") == 1
    assert value(scrape, "gateway_worker_restarts_total", model="digits", worker="1") == 0


@pytest.mark.anyio
async def test_hung_worker_answers_504_then_is_replaced(gw2: Gateway) -> None:
    health = _worker_health(gw2, 1)
    assert health is not None
    hung_pid = int(health["pid"])  # type: ignore[arg-type]
    os.kill(hung_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        async with gw2.async_client() as c:
            answers = await asyncio.gather(*(c.post(INFER, json=_payload(np.ones((1, 64), np.float32)))
                                             for _ in range(8)))
        elapsed = time.monotonic() - started
        codes = {r.status_code for r in answers}
        assert codes <= {200, 504}, codes
        assert elapsed < 10, "no request hangs past its deadline"
        deadline = time.monotonic() + 25  # hang detection (10 s) + restart
        while time.monotonic() < deadline:
            h = _worker_health(gw2, 1)
            if h and h["pid"] != hung_pid:
                break
            await asyncio.sleep(0.5)
        else:
            pytest.fail("the hung worker was not replaced")
    finally:
        try:
            os.kill(hung_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.anyio
async def test_a_thousand_concurrent_unique_inputs_each_get_their_own_output(gw2: Gateway, models_root: Path) -> None:
    xs = np.random.default_rng(1).uniform(0, 16, (1000, 64)).astype(np.float32)
    expected = onnx_reference(models_root, "digits", xs)
    # A thousand requests in flight at once over 50 connections (no handshake storm: on a slow
    # two-core machine 200 simultaneous mTLS handshakes from one Python client take longer than
    # the gateway's handshake timeout, and that is not what this test is about).
    async with gw2.async_client(limits=httpx.Limits(max_connections=50), timeout=120) as c:
        answers = await asyncio.gather(*(c.post(INFER, json=_payload(xs[i : i + 1])) for i in range(1000)))
    got = np.array([r.json()["outputs"][0]["data"] for r in answers], dtype=np.float32)
    assert all(r.status_code == 200 for r in answers)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    batches = sum(int(h["batches"]) for h in (_worker_health(gw2, i) for i in (0, 1)) if h)  # type: ignore[call-overload]
    requests = sum(int(h["requests"]) for h in (_worker_health(gw2, i) for i in (0, 1)) if h)  # type: ignore[call-overload]
    assert batches < requests, "concurrent requests shared session runs"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_no_worker_outlives_the_gateway(pki: Path, tmp_path: Path, models_root: Path, sig: signal.Signals) -> None:
    gw = start_gateway(pki, tmp_path, models_root)
    pids = [int(h["pid"]) for h in (fetch_health(str(gw.runtime_dir() / f"{m}-0.sock")) for m in ("digits", "resnetish")) if h]  # type: ignore[arg-type]
    assert len(pids) == 2
    gw.proc.send_signal(sig)
    gw.proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a worker outlived its gateway"
    if sig == signal.SIGTERM:
        assert gw.proc.returncode == 128 + signal.SIGTERM
        assert not gw.runtime_dir().exists(), "a clean stop removes the sockets' directory"
