"""A worker's HTTP answers (health documents; inferences from a worker host) are input: one that
never ends, or ends too late, is cut off before it is kept, in the serving process and in the
supervisor's health checks."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.workers import transport
from gateway.workers.local import UnixSocketTransport, fetch_health
from gateway.workers.transport import MAX_HEALTH_BYTES, AnswerTooLarge, HTTPTransport, WorkerConnectionLost
from gateway_client.protocol.codec import Tensor
from tests.hostile_peers import SLACK, answering, first_sent, flood, trickle


def _listening(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "w.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    return server, path


@contextlib.asynccontextmanager
async def _flooding_worker(tmp_path: Path) -> AsyncIterator[tuple[UnixSocketTransport, list[int]]]:
    """The gateway's transport to a worker that answers every request with an endless flood."""
    server, path = _listening(tmp_path)
    with answering(server, flood) as sent:
        worker = UnixSocketTransport(path)
        try:
            yield worker, sent
        finally:
            await worker.aclose()


@pytest.mark.anyio
async def test_an_endless_health_answer_is_cut_off_at_its_limit(tmp_path: Path) -> None:
    async with _flooding_worker(tmp_path) as (worker, sent):
        assert await worker.health(timeout=10) is None
    assert first_sent(sent) < MAX_HEALTH_BYTES + SLACK, f"{sent[0] >> 20} MiB of a health answer read"


@pytest.mark.anyio
async def test_an_answer_past_its_limit_closes_the_connection(tmp_path: Path) -> None:
    async with _flooding_worker(tmp_path) as (worker, sent):
        with pytest.raises(WorkerConnectionLost, match="passed"):
            await worker.request("POST", "/infer", b"{}", timeout=10, limit=1 << 20)
    assert first_sent(sent) < (1 << 20) + SLACK


@pytest.mark.anyio
async def test_an_inference_over_http_is_held_to_its_requests_bound(tmp_path: Path) -> None:
    """As a worker host's answers reach the gateway: the request's bound (``answer_bound``) cuts
    the answer off, not the 256 MiB that holds every answer."""
    inputs = [Tensor("input", np.zeros((1, 64), np.float32))]
    async with _flooding_worker(tmp_path) as (worker, sent):
        with pytest.raises(AnswerTooLarge, match="passed"):
            await HTTPTransport.infer(worker, inputs, 10, limit=1 << 20)
    assert first_sent(sent) < (1 << 20) + SLACK


@pytest.mark.anyio
async def test_answers_arriving_together_are_bounded_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each answer is bounded on its own (256 MiB), but up to ``max_inflight`` arrive at once from
    a worker host: a compromised one made the serving process hold 256 MiB times the requests in
    flight. Their unfinished bytes together are held to ``ANSWERS_IN_FLIGHT_BYTES`` (here 16 MiB)."""
    import asyncio

    server, path = _listening(tmp_path)
    inputs = [Tensor("input", np.zeros((1, 64), np.float32))]
    monkeypatch.setattr(transport, "ANSWERS_IN_FLIGHT_BYTES", 16 << 20, raising=False)
    with answering(server, flood, together=True) as sent:
        worker = UnixSocketTransport(path)
        try:
            results = await asyncio.gather(*(HTTPTransport.infer(worker, inputs, 20) for _ in range(8)),
                                           return_exceptions=True)
        finally:
            await worker.aclose()
        deadline = time.monotonic() + 10
        while len(sent) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    assert all(isinstance(r, WorkerConnectionLost) for r in results), results
    assert any("answers in flight passed 16777216 bytes" in str(r) for r in results), results
    assert sum(sent) < (16 << 20) + 8 * SLACK, f"{sum(sent) >> 20} MiB of eight answers read (64 MiB each)"
    assert worker._in_flight.held == 0


def test_the_supervisors_health_check_reads_at_most_its_limit(tmp_path: Path) -> None:
    server, path = _listening(tmp_path)
    with answering(server, flood) as sent:
        assert fetch_health(path, timeout=10) is None
        assert first_sent(sent) < MAX_HEALTH_BYTES + SLACK, f"{sent[0] >> 20} MiB of a health answer read"


def test_the_supervisors_health_check_gives_up_at_its_timeout_however_the_bytes_trickle(tmp_path: Path) -> None:
    """Each byte came within the socket's timeout, so a worker could hold the check (and the
    supervisor's thread that runs every worker's) for as long as it liked."""
    server, path = _listening(tmp_path)
    with answering(server, trickle):
        started = time.monotonic()
        assert fetch_health(path, timeout=1.0) is None
        assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("value,refused", [(8, True), (2 << 20, True), (16, False), (1024, False)])
def test_the_answers_in_flight_setting_is_checked_and_reaches_each_worker_host(value: int, refused: bool,
                                                                             pki: Path) -> None:
    from gateway.config import Config, ModelConfig, RemoteWorkersConfig
    from gateway.configchecks import remote_worker_problems
    from gateway.workers.pool import remote_clients

    cert, key, ca = (str(pki / "certs" / name) for name in ("client-demo.pem", "client-demo.key", "ca.pem"))
    remote = RemoteWorkersConfig(answers_in_flight_mb=value, cert_file=cert, key_file=key, ca_file=ca)
    config = Config(models=(ModelConfig("digits", endpoints=("gpu-1.internal:9443",)),), remote_workers=remote)
    problems = "\n".join(remote_worker_problems(config))
    assert ("remote_workers.answers_in_flight_mb must be 16..1048576" in problems) is refused, problems
    if not refused:
        [client] = remote_clients(config)["digits"]
        assert client.transport._in_flight.limit == value << 20  # type: ignore[attr-defined]
