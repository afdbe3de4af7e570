"""Worker isolation and start-up policy, observed on real worker processes."""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.workers.local import fetch_health
from tests.conftest import Gateway, start_gateway, write_config
from tests.test_metrics import value

ALLOWED_ENV = {"PATH", "LANG", "HOME", "PYTHONDONTWRITEBYTECODE", "OMP_NUM_THREADS", "PYTHONPATH",
               "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "TZ", "OPENBLAS_CORETYPE"}


def _health(gw: Gateway, model: str = "digits") -> dict[str, object]:
    health = fetch_health(str(gw.runtime_dir() / f"{model}-0.sock"))
    assert health is not None
    return health


def test_worker_environment_is_scrubbed(gateway: Gateway) -> None:
    pid = int(_health(gateway)["pid"])  # type: ignore[arg-type]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = {e.split(b"=", 1)[0].decode() for e in environ if e}
    assert names <= ALLOWED_ENV, names - ALLOWED_ENV
    assert not any(n.startswith("GATEWAY") for n in names)


def test_runtime_directory_is_private(gateway: Gateway) -> None:
    assert (gateway.runtime_dir().stat().st_mode & 0o777) == 0o700


def test_workers_start_in_an_empty_directory_of_the_gateways(gateway: Gateway) -> None:
    """A relative path a model names (external data, say) finds nothing: the working directory is
    empty, and the worker cannot write to it."""
    for model in ("digits", "resnetish"):
        pid = int(_health(gateway, model)["pid"])  # type: ignore[arg-type]
        cwd = Path(f"/proc/{pid}/cwd").resolve()
        assert cwd == gateway.runtime_dir() / "empty" and os.listdir(cwd) == []
        assert cwd.stat().st_uid == os.geteuid() and (cwd.stat().st_mode & 0o222) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop and network namespaces apply when started as root")
def test_root_gateway_runs_workers_unprivileged_without_network(gateway: Gateway) -> None:
    isolation = _health(gateway)["isolation"]
    assert isolation["uid"] != 0  # type: ignore[index]
    assert isolation["network_isolated"] is True  # type: ignore[index]
    pid = int(_health(gateway)["pid"])  # type: ignore[arg-type]
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uid_line.split()[1:]) == {str(isolation["uid"])}  # type: ignore[index]
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert any(line.startswith("Max core file size") and line.split()[4] == "0" for line in limits.splitlines())


def _cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_cuda_driver(), reason="CUDA is present here: bench/gpu_check.py checks the CUDA path")
def test_device_cuda_fails_loudly_without_cuda(pki: Path, tmp_path: Path, models_root: Path) -> None:
    config = write_config(pki, tmp_path, models_root, port=1, digits_device="cuda")
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert 'device = "cuda" but the CUDA execution provider is not active' in out.stderr
    assert "Traceback" not in out.stderr


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_several_serving_processes_share_a_burst_of_connections(pki: Path, tmp_path: Path, models_root: Path) -> None:
    gw = start_gateway(pki, tmp_path, models_root, extra="processes = 2\n")
    try:
        children = subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True).stdout.split()
        serving = [int(p) for p in children if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(serving) == 2
        before = {p: _cpu_ticks(p) for p in serving}
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}

        async def burst() -> list[int]:
            # 32 connections opened at the same moment: the case where one shared socket lets
            # a single process accept them all.
            clients = [gw.async_client() for _ in range(32)]

            async def use(c: httpx.AsyncClient) -> list[int]:
                async with c:
                    return [(await c.post("/v2/models/digits/infer", json=body)).status_code for _ in range(25)]

            return [s for statuses in await asyncio.gather(*(use(c) for c in clients)) for s in statuses]

        assert set(asyncio.run(burst())) == {200}
        used = {p: _cpu_ticks(p) - before[p] for p in serving}
        assert min(used.values()) >= 0.2 * sum(used.values()), used
        # every scrape, whichever process answers it, counts the requests of both
        for _ in range(4):
            with gw.client("admin") as admin:
                text = admin.get("/metrics").text
            served = value(text, "gateway_requests_total", route="infer", model="digits", status="200")
            assert served == 800, served
    finally:
        gw.stop()
