"""Connections that never start their TLS handshake cannot exhaust the gateway.

The gateway runs with 1,024 file descriptors; 1,500 idle TCP connections arrive from one address
(an attacker needs no certificate for that). Connections past the caps are closed at once, the
rest after the handshake timeout, a real mTLS client from another address is answered all along,
no worker is restarted, and the failures are on the audit record with the address they came from.
"""

from __future__ import annotations

import resource
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, client_context, start_gateway

FLOOD = 1500


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_idle_connections_past_the_caps_are_closed_and_clients_still_served(
        pki: Path, tmp_path: Path, models_root: Path) -> None:
    gw = start_gateway(pki, tmp_path, models_root, preexec=_limit_files,
                       extra="handshake_timeout_s = 2\nmax_pending_handshakes_per_address = 64\n")
    flood: list[socket.socket] = []
    try:
        workers = {m: gw.worker_pids(m) for m in ("digits", "resnetish")}
        token = gw.token("demo")
        for _ in range(FLOOD):
            flood.append(socket.create_connection(("127.0.0.1", gw.port), timeout=5))
        transport = httpx.HTTPTransport(verify=client_context(pki, "demo"), local_address="127.0.0.2")
        with httpx.Client(transport=transport, base_url=gw.url, timeout=10,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            for _ in range(5):  # a real client, from another address, while the flood is held open
                r = c.post("/v2/models/digits/infer", json={"inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [4.0] * 64}]})
                assert r.status_code == 200, r.text
                time.sleep(0.3)
        time.sleep(2.5)  # past the handshake timeout: every flood connection has been closed by now
        closed = 0
        for s in flood:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed == FLOOD, f"{FLOOD - closed} idle connections still open after the handshake timeout"
        assert {m: gw.worker_pids(m) for m in workers} == workers, "a worker was restarted"
        log = gw.log.read_text()
        assert "Too many open files" not in log and "unresponsive" not in log
        deadline = time.monotonic() + 15
        while True:
            tls = [r for r in gw.audit_records() if r.get("kind") == "tls"]
            reasons = {k for r in tls for k in r.get("by_address", {}).get("127.0.0.1", {})}
            if {"handshake timeout", "too many handshakes in progress from this address"} <= reasons:
                break
            assert time.monotonic() < deadline, f"no per-address record of the flood: {tls}"
            time.sleep(0.5)
        assert not any("127.0.0.2" in r.get("by_address", {}) for r in tls), "the good client was counted"
    finally:
        for s in flood:
            s.close()
        gw.stop()


def _served(gw: Gateway, source: str, token: str) -> ssl.SSLSocket:
    """A kept-alive mTLS connection from ``source`` that has had one request answered 200."""
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=5, source_address=(source, 0))
    tls = client_context(gw.pki, "demo").wrap_socket(raw, server_hostname="localhost")
    tls.sendall(f"GET /v2/models/digits HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    assert tls.recv(65536).startswith(b"HTTP/1.1 200"), "the connection was not served"
    return tls


def test_one_address_cannot_hold_every_connection(pki: Path, tmp_path: Path, models_root: Path) -> None:
    """Kept-alive connections from one address count against ``server.max_connections_per_address``
    (8 here): one client held 2,048 idle ones with a request each every few seconds, and every
    other client got 503 for as long as it went on. Past the limit its connections are closed before
    any handshake; other addresses are served, a closed connection frees its place, and the
    refusals are on the audit record with the address."""
    gw = start_gateway(pki, tmp_path, models_root, extra="max_connections_per_address = 8\n")
    held: list[ssl.SSLSocket] = []
    try:
        token = gw.token("demo")
        held = [_served(gw, "127.0.0.1", token) for _ in range(8)]
        with pytest.raises(OSError):  # reset, or closed during the handshake
            held.append(_served(gw, "127.0.0.1", token))
        other = _served(gw, "127.0.0.2", token)
        other.close()
        held.pop(0).close()
        deadline = time.monotonic() + 5
        while True:  # the server sees the close within a moment
            try:
                held.append(_served(gw, "127.0.0.1", token))
                break
            except OSError:
                assert time.monotonic() < deadline, "a closed connection did not free its place"
                time.sleep(0.2)
        deadline = time.monotonic() + 15
        while True:
            tls = [r for r in gw.audit_records() if r.get("kind") == "tls"]
            reasons = {k for r in tls for k in r.get("by_address", {}).get("127.0.0.1", {})}
            if "too many connections from this address" in reasons:
                break
            assert time.monotonic() < deadline, f"no record of the refusal: {tls}"
            time.sleep(0.5)
    finally:
        for c in held:
            c.close()
        gw.stop()
