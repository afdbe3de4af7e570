"""The audit log of running gateways: one record per request, fail-closed, kill -9, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.audit.chain import load_public_key, stream_files, verify_paths
from tests.conftest import Gateway, start_gateway

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"


def records(gw: Gateway) -> list[dict[str, object]]:
    return gw.audit_records()


def by_request(gw: Gateway) -> dict[str, list[dict[str, object]]]:
    found: dict[str, list[dict[str, object]]] = {}
    for r in records(gw):
        if r.get("kind") == "request":
            found.setdefault(str(r["request_id"]), []).append(r)
    return found


def _binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def test_each_request_has_one_record_with_who_what_and_why(gateway: Gateway) -> None:
    x = np.full((2, 64), 7.77777, np.float32)
    body, headers = _binary(x)
    with gateway.client() as c, gateway.client(token=False) as anon:
        answers = {
            "allowed": c.post(INFER, content=body, headers=headers),
            "no token": anon.post(INFER, content=body, headers=headers),
            "bad token": anon.post(INFER, content=body, headers={**headers, "Authorization": "Bearer x.y.z"}),
            "malformed": c.post(INFER, content=b"{", headers={"content-type": "application/json"}),
            "hidden model": c.get("/admin/models"),
            "out of domain": c.post(INFER, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                            "data": [99.0] * 64}]}),
        }
    log = by_request(gateway)
    for what, r in answers.items():
        rid = r.headers["x-request-id"]
        assert len(log.get(rid, [])) == 1, f"{what}: {len(log.get(rid, []))} records for {rid}"
        assert log[rid][0]["status"] == r.status_code, what
    ok = log[answers["allowed"].headers["x-request-id"]][0]
    assert ok["outcome"] == "allow" and ok["model"] == "digits" and ok["version"] == "1" and ok["route"] == "infer"
    assert ok["principal"]["subject"] == "demo" and ok["principal"]["roles"] == ["inference"]  # type: ignore[index]
    assert ok["decision"]["rule"] == "inference" and ok["decision"]["verb"] == "infer"  # type: ignore[index]
    assert ok["inputs"][0]["sha256"] == hashlib.sha256(x.tobytes()).hexdigest()  # type: ignore[index]
    assert ok["inputs"][0]["shape"] == [2, 64] and ok["outputs"][0]["name"] == "probabilities"  # type: ignore[index]
    assert ok["worker"] == "digits-0" and ok["client"]["cert_sha256"]  # type: ignore[index]
    outcomes = {what: log[r.headers["x-request-id"]][0]["outcome"] for what, r in answers.items()}
    assert outcomes == {"allowed": "allow", "no token": "deny", "bad token": "deny", "malformed": "rejected",
                        "hidden model": "deny", "out of domain": "rejected"}
    assert log[answers["bad token"].headers["x-request-id"]][0]["reason"]["type"] == "unauthorized"  # type: ignore[index]
    text = "".join(f.read_text() for fs in stream_files([gateway.config.parent / "audit"]).values() for f in fs)
    assert gateway.token("demo") not in text and "x.y.z" not in text  # never a token
    assert "7.77777" not in text  # never tensor data, only digests (latencies have three decimals)


def test_metrics_need_the_metrics_verb(gateway: Gateway) -> None:
    with gateway.client() as c:
        c.post(INFER, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]})
        assert c.get("/metrics").status_code == 403  # "inference" may not read metrics
    with gateway.client("admin") as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'gateway_requests_total{model="digits",outcome="allow",route="infer",status="200",version="1"}' in text
    assert 'gateway_request_duration_seconds_bucket{le="0.005",model="digits",route="infer",version="1"}' in text
    assert 'gateway_model_execution_provider{model="digits",provider="CPUExecutionProvider"} 1.0' in text
    assert 'gateway_batch_size_count{model="digits",worker="0"}' in text
    assert "gateway_worker_queue_depth" in text and "gateway_audit_records_total" in text


def test_an_unwritable_audit_directory_turns_inference_into_503_and_back(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> None:
    tmp = tmp_path_factory.mktemp("gw-audit-fail")
    gw = start_gateway(pki, tmp, models_root)
    stream = tmp / "audit" / "p0"
    try:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
        with gw.client() as c:
            assert c.post(INFER, json=body).status_code == 200
            stream.rename(tmp / "audit" / "p0.away")
            stream.write_text("not a directory")  # the path no longer leads anywhere writable
            refused = [c.post(INFER, json=body) for _ in range(3)]
            assert [r.status_code for r in refused] == [503] * 3
            assert refused[0].json()["type"].endswith("audit-unavailable") and refused[0].headers["retry-after"]
            with gw.client(token=False) as anon:
                assert anon.get("/v2/health/live").status_code == 200
            stream.unlink()
            (tmp / "audit" / "p0.away").rename(stream)
            deadline = time.monotonic() + 10
            while c.post(INFER, json=body).status_code != 200:
                assert time.monotonic() < deadline, "inference did not come back"
                time.sleep(0.3)
    finally:
        gw.stop()
    report = verify_paths([tmp / "audit"], load_public_key(pki / "keys" / "audit-signing.pub"))
    assert report.ok, report.problems
    assert "cannot be written" in gw.log.read_text() and "writable again" in gw.log.read_text()


async def _load(gw: Gateway, received: list[tuple[str, int]], stop: asyncio.Event) -> None:
    """Mixed traffic until the gateway dies: allowed, denied, rate-limited and malformed requests."""
    good = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [2.0] * 64}]}
    kinds = [({}, good), ({"Authorization": "Bearer bad"}, good), ({}, {"inputs": "nope"}), ({}, good)]
    async with gw.async_client(limits=httpx.Limits(max_connections=16)) as c:
        async def one(i: int) -> None:
            headers, body = kinds[i % len(kinds)]
            while not stop.is_set():
                try:
                    r = await c.post(INFER, json=body, headers=headers)
                except httpx.HTTPError:
                    return  # the gateway is gone: whatever did not arrive does not count
                received.append((r.headers["x-request-id"], r.status_code))
        await asyncio.gather(*(one(i) for i in range(16)))


@pytest.mark.anyio
async def test_kill_9_under_load_loses_no_record_of_an_answered_request(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> None:
    tmp = tmp_path_factory.mktemp("gw-audit-kill")
    # Low enough that even a slow machine's first 2.5 s of load trips it (the mix must hold 429s).
    limits = 'per_principal = "40/minute"\nfailed_auth_per_address = "100000/minute"\nper_address = "100000/minute"\n'
    gw = start_gateway(pki, tmp, models_root, limits=limits)
    gw.token("demo")
    received: list[tuple[str, int]] = []
    stop = asyncio.Event()
    load = asyncio.get_running_loop().create_task(_load(gw, received, stop))
    await asyncio.sleep(2.5)
    gw.proc.kill()  # SIGKILL: no shutdown, no closing checkpoint
    gw.proc.wait()
    stop.set()
    await load
    statuses = {s for _, s in received}
    assert {200, 400, 401, 429} <= statuses, statuses  # the mix really was mixed
    log = by_request(gw)
    missing = [(rid, s) for rid, s in received if len(log.get(rid, [])) != 1]
    assert not missing, f"{len(missing)} answered requests without exactly one record: {missing[:5]}"
    assert all(log[rid][0]["status"] == s for rid, s in received)
    public = load_public_key(pki / "keys" / "audit-signing.pub")
    after_crash = verify_paths([tmp / "audit"], public, allow_unsealed=True)
    assert after_crash.ok, after_crash.problems
    seq_before = after_crash.records

    restarted = start_gateway(pki, tmp, models_root, limits=limits)  # the same audit directory
    try:
        with restarted.client() as c:
            assert c.post(INFER, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                   "data": [1.0] * 64}]}).status_code == 200
    finally:
        restarted.stop()
    sealed = verify_paths([tmp / "audit"], public)
    assert sealed.ok, sealed.problems  # the chain continued from the last complete record, and was closed
    assert sealed.records > seq_before


def test_failed_tls_handshakes_are_counted_as_connection_events(gateway: Gateway) -> None:
    import socket
    import ssl

    from tests.conftest import client_context

    def failed_total() -> int:
        return sum(int(r.get("failed_handshakes", 0)) for r in records(gateway) if r.get("kind") == "tls")

    before = failed_total()
    for _ in range(3):  # no client certificate: the handshake fails and never reaches the application
        ctx = client_context(gateway.pki, principal=None)
        try:
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
                tls.recv(100)
        except (ssl.SSLError, OSError):
            pass
    deadline = time.monotonic() + 15
    while failed_total() < before + 3:
        assert time.monotonic() < deadline, "the failed handshakes were not recorded"
        time.sleep(0.5)
    with gateway.client("admin") as c:
        assert "gateway_tls_handshake_failures_total" in c.get("/metrics").text


def test_audit_export_and_tail_filter_records(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    with gateway.client() as c:
        c.post(INFER, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]})
    audit_dir = str(gateway.config.parent / "audit")
    assert main(["audit", "export", audit_dir, "--config", str(gateway.config), "--principal", "demo",
                 "--model", "digits", "--outcome", "allow"]) == 0
    exported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert exported and all(r["principal"]["subject"] == "demo" and r["model"] == "digits" and r["outcome"] == "allow"
                            for r in exported)
    assert main(["audit", "tail", audit_dir, "-n", "3", "--config", str(gateway.config)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["audit", "verify", audit_dir, "--allow-unsealed", "--config", str(gateway.config)]) == 0
    assert "verified" in capsys.readouterr().out


def test_audit_verify_defaults_to_the_configured_directory(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["audit", "verify", "--allow-unsealed", "--config", str(gateway.config)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "streams p0" in out


def test_fail_closed_off_serves_unrecorded_and_is_reported(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> None:
    from gateway.config import load_config

    tmp = tmp_path_factory.mktemp("gw-audit-open")
    gw = start_gateway(pki, tmp, models_root, audit="fail_closed = false")
    stream = tmp / "audit" / "p0"
    try:
        assert any("fail_closed = false" in w for w in load_config(gw.config).insecure_settings())
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
        with gw.client() as c:
            stream.rename(tmp / "audit" / "p0.away")
            stream.write_text("not a directory")
            assert c.post(INFER, json=body).status_code == 200  # served, by explicit choice, unrecorded
            stream.unlink()
            (tmp / "audit" / "p0.away").rename(stream)
    finally:
        gw.stop()
    assert "could not be recorded" in gw.log.read_text() or "cannot be written" in gw.log.read_text()


def test_replicas_share_one_audit_directory_without_contending(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> None:
    """Two gateways on one audit volume (as replicas with a shared volume would be): each writes
    streams of its own name, and the directory verifies as one log."""
    shared = tmp_path_factory.mktemp("shared-audit")
    gateways = []
    try:
        for name in ("gw-a", "gw-b"):
            tmp = tmp_path_factory.mktemp(name)
            (tmp / "audit").symlink_to(shared)
            gateways.append(start_gateway(pki, tmp, models_root, audit=f'replica = "{name}"'))
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
        for gw in gateways:
            with gw.client() as c:
                assert c.post(INFER, json=body).status_code == 200
    finally:
        for gw in gateways:
            gw.stop()
    assert set(stream_files([shared])) == {"gw-a-p0", "gw-a-supervisor", "gw-b-p0", "gw-b-supervisor"}
    report = verify_paths([shared], load_public_key(pki / "keys" / "audit-signing.pub"))
    assert report.ok, report.problems
