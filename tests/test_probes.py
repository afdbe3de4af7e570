"""The plain-HTTP probe listener answers liveness and readiness, and nothing else."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, free_port, start_gateway


@pytest.fixture(scope="module")
def probed(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[tuple[Gateway, int]]:
    port = free_port()
    gw = start_gateway(pki, tmp_path_factory.mktemp("probes"), models_root, extra=f"probe_port = {port}\n")
    yield gw, port
    gw.stop()


@pytest.fixture(scope="module")
def summarized(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Gateway]:
    gw = start_gateway(pki, tmp_path_factory.mktemp("summarized"), models_root, audit="probe_summary_s = 1\n")
    yield gw
    gw.stop()


def test_probes_are_counted_into_a_summary_not_recorded_one_by_one(summarized: Gateway) -> None:
    """One connection probing all day once wrote ~14 GB of audit records (536 bytes and an fsync each)."""
    with summarized.client(token=False) as c:
        for _ in range(30):
            assert c.get("/v2/health/live").status_code == 200
            time.sleep(0.07)  # under the per-address probe limit (20 per second)
    deadline = time.monotonic() + 10
    while True:
        records = summarized.audit_records()
        counted = sum(n["count"] for r in records if r.get("kind") == "probes" for n in r["counts"]
                      if n["path"] == "/v2/health/live" and n["status"] == 200 and n["address"] == "127.0.0.1")
        if counted >= 30:
            break
        assert time.monotonic() < deadline, f"only {counted} probes in the summaries"
        time.sleep(0.5)
    assert not [r for r in records if r.get("kind") == "request" and str(r.get("path", "")).startswith("/v2/health")]
    assert sum(1 for r in records if r.get("kind") == "probes") <= 15  # one per second at most, not one per probe


def test_probes_have_a_cheap_per_address_limit(summarized: Gateway) -> None:
    with summarized.client(token=False) as c:
        statuses = [c.get("/v2/health/ready") for _ in range(60)]
        refused = [r for r in statuses if r.status_code == 429]
        assert refused and refused[0].headers["content-type"] == "application/problem+json"
        assert refused[0].json()["policy"] == "per-address-probes" and "retry-after" in refused[0].headers
        time.sleep(1.1)
        assert c.get("/v2/health/ready").status_code == 200


def test_probe_listener_reports_live_and_ready(probed: tuple[Gateway, int]) -> None:
    _, port = probed
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("path", ["/v2", "/v2/models/digits", "/metrics", "/"])
def test_probe_listener_reveals_nothing_else(probed: tuple[Gateway, int], path: str) -> None:
    _, port = probed
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
        assert c.get(path).status_code == 404
        assert c.post("/v2/models/digits/infer", json={}).status_code == 404


def test_probe_port_with_several_processes_is_refused(pki: Path) -> None:
    from gateway.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="probe_port"):
        load_config(pki / "gateway.toml", environ={"GATEWAY__SERVER__PROBE_PORT": "8081", "GATEWAY__SERVER__PROCESSES": "2"})


def test_ready_when_any_keeps_a_replica_in_rotation_while_one_model_is_away() -> None:
    """server.ready_when: "all" (default) answers 503 while any model has no healthy worker;
    "any" stays 200 as long as one model can serve."""
    import asyncio
    from types import SimpleNamespace

    from gateway.probes import ProbeApp
    from gateway.workers.pool import WorkerPool

    healthy = {"digits": True, "resnetish": False}
    pool = SimpleNamespace(workers=healthy, ready=lambda key: healthy[key])
    pool.all_ready = lambda: WorkerPool.all_ready(pool)  # type: ignore[arg-type]
    pool.is_ready = lambda when: WorkerPool.is_ready(pool, when)  # type: ignore[arg-type]

    def status(when: str) -> int:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/v2/health/ready"}
        asyncio.run(ProbeApp(pool, when)(scope, None, send))  # type: ignore[arg-type]
        return int(sent[0]["status"])  # type: ignore[call-overload]

    assert status("all") == 503 and status("any") == 200
    assert WorkerPool.not_ready(pool) == ["resnetish"]  # type: ignore[arg-type]
    healthy["digits"] = False
    assert status("any") == 503


def test_the_log_names_the_tls_listener_https(summarized: Gateway) -> None:
    """uvicorn's start-up line names the scheme from its own TLS settings, which are off: the
    gateway's handshake guard does TLS, so the line must not say http."""
    log = summarized.log.read_text()
    assert f"Uvicorn running on https://127.0.0.1:{summarized.port} " in log, log[-2000:]
    assert "Uvicorn running on http://" not in log
