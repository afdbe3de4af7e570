"""The plain-HTTP probe listener answers liveness and readiness, and nothing else."""

from __future__ import annotations

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
