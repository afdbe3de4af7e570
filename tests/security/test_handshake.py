"""Real TLS handshakes against a running gateway: mTLS required, TLS 1.3 only by default."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.security.pki import issue_certificate, load_ca, make_ca, write_key, write_pem
from tests.conftest import Gateway, client_context


def _handshake_and_get(gw: Gateway, ctx: ssl.SSLContext) -> bytes:
    """Send a request on a raw TLS socket and return the answer's first bytes.

    In TLS 1.3 the client's side of the handshake completes before the server has checked the
    client certificate, so a refusal shows on the first read: as the server's alert, or (the
    asyncio and uvloop transports abort without flushing it) as a closed connection.
    """
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /v2/health/ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            try:
                return tls.recv(4096)
            except (ssl.SSLError, ConnectionResetError):
                return b""


def _refused(gw: Gateway, ctx: ssl.SSLContext) -> bool:
    try:
        return _handshake_and_get(gw, ctx) == b""
    except ssl.SSLError:
        return True


def test_demo_certificate_is_accepted(gateway: Gateway) -> None:
    assert _handshake_and_get(gateway, client_context(gateway.pki)).startswith(b"HTTP/1.1 200")


def test_no_client_certificate_fails_the_handshake(gateway: Gateway) -> None:
    assert _refused(gateway, client_context(gateway.pki, principal=None))


def test_certificate_from_a_foreign_ca_fails_the_handshake(gateway: Gateway, tmp_path: Path) -> None:
    foreign = make_ca("Someone Else's CA")
    intruder = issue_certificate(foreign, "demo", server=False)
    write_pem(tmp_path / "c.pem", intruder.cert)
    write_key(tmp_path / "c.key", intruder.key)
    ctx = client_context(gateway.pki, principal=None)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "c.key")
    assert _refused(gateway, ctx)


@pytest.mark.parametrize("kind", ["expired", "not-yet-valid", "server-auth-only"])
def test_client_certificates_from_our_ca_that_are_unfit_are_refused(gateway: Gateway, tmp_path: Path, kind: str) -> None:
    now = dt.datetime.now(dt.UTC)
    options: dict[str, object] = {
        "expired": {"not_before": now - dt.timedelta(days=10), "days": 2},
        "not-yet-valid": {"not_before": now + dt.timedelta(days=1)},
        "server-auth-only": {"usage": ExtendedKeyUsageOID.SERVER_AUTH},
    }[kind]
    cert = issue_certificate(load_ca(gateway.pki / "certs"), "demo", server=False, **options)  # type: ignore[arg-type]
    write_pem(tmp_path / "c.pem", cert.cert)
    write_key(tmp_path / "c.key", cert.key)
    ctx = client_context(gateway.pki, principal=None)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "c.key")
    assert _refused(gateway, ctx)
    # the same CA's valid demo certificate still gets in
    assert _handshake_and_get(gateway, client_context(gateway.pki)).startswith(b"HTTP/1.1 200")


def test_tls_1_2_is_refused_by_default(gateway: Gateway) -> None:
    ctx = client_context(gateway.pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):  # the server aborts the handshake (no alert flushed)
        _handshake_and_get(gateway, ctx)


def test_failed_handshakes_are_recorded_with_their_address_and_reason(gateway: Gateway) -> None:
    """Counted where they fail (a TLS 1.2 attempt included), with the client's address: never
    guessed from counters that handshakes merely in progress would skew."""
    import time

    def attempt(ctx: ssl.SSLContext) -> None:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5, source_address=("127.0.0.3", 0)) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\n\r\n")
                    tls.recv(100)
            except (ssl.SSLError, OSError):
                pass

    old = client_context(gateway.pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    attempt(old)
    attempt(client_context(gateway.pki, principal=None))
    deadline = time.monotonic() + 15
    while True:
        reasons: dict[str, int] = {}
        for record in gateway.audit_records():
            if record.get("kind") == "tls":
                for reason, n in record.get("by_address", {}).get("127.0.0.3", {}).items():
                    reasons[reason] = reasons.get(reason, 0) + n
        if {"unsupported_protocol", "peer_did_not_return_a_certificate"} <= set(reasons):
            break
        assert time.monotonic() < deadline, reasons
        time.sleep(0.5)


def test_server_certificate_verifies_for_localhost_and_loopback_addresses(gateway: Gateway) -> None:
    for host in ("localhost", "127.0.0.1"):
        with httpx.Client(verify=client_context(gateway.pki)) as c:
            assert c.get(f"https://{host}:{gateway.port}/v2/health/live").status_code == 200


def test_negotiates_tls_1_3(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw:
        with client_context(gateway.pki).wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.3"


@pytest.mark.parametrize("groups,accepted", [
    ("X25519", True), ("prime256v1", True), ("secp384r1", True),
    ("x448", False), ("secp521r1", False), ("ffdhe2048:ffdhe3072", False),
])
def test_key_exchange_only_over_mozilla_modern_groups(gateway: Gateway, groups: str, accepted: bool) -> None:
    import subprocess

    certs = gateway.pki / "certs"
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.port}", "-servername", "localhost",
                          "-groups", groups, "-brief", "-CAfile", str(certs / "ca.pem"),
                          "-cert", str(certs / "client-demo.pem"), "-key", str(certs / "client-demo.key")],
                         input=b"", capture_output=True, timeout=30)
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert ("CONNECTION ESTABLISHED" in text) == accepted, text[-600:]
