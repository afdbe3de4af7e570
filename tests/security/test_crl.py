"""Client-certificate revocation lists: a revoked certificate fails the handshake with the TLS
alert that says so (as do a certificate from an unknown CA and none at all), a changed CRL is
picked up without a restart, and certificates not on it are served."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.security.pki import Issued, issue_certificate, load_ca, make_ca, write_key, write_pem
from tests.conftest import Gateway, start_gateway

pytestmark = pytest.mark.slow


def write_crl(path: Path, ca: Issued, revoked: list[x509.Certificate], der: bool = False) -> None:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now - dt.timedelta(minutes=1)).next_update(now + dt.timedelta(days=1)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now).build())
    crl = builder.sign(ca.key, hashes.SHA256())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM))
    tmp.replace(path)


def client_files(tmp: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    write_pem(cert, issued.cert)
    write_key(key, issued.key)
    return cert, key


@pytest.fixture(scope="module")
def crl_gateway(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[tuple[Gateway, Path]]:
    tmp = tmp_path_factory.mktemp("gw-crl")
    ca = load_ca(pki / "certs")
    revoked = issue_certificate(ca, "stolen-laptop", server=False, uris=("spiffe://gateway.local/principal/demo",))
    later = issue_certificate(ca, "later", server=False, uris=("spiffe://gateway.local/principal/demo",))
    client_files(tmp, "revoked", revoked)
    client_files(tmp, "later", later)
    client_files(tmp, "stranger", issue_certificate(make_ca("Someone Else's CA"), "stranger", server=False))
    (tmp / "later.serial").write_text(str(later.cert.serial_number))
    write_crl(tmp / "ca.crl", ca, [revoked.cert], der=True)
    gw = start_gateway(pki, tmp, models_root, tls=f'crl_files = ["{tmp / "ca.crl"}"]\n')
    yield gw, tmp
    gw.stop()


def handshake(gw: Gateway, cert: Path | None, key: Path | None) -> str:
    """What a Python client meets: "ok", or the TLS error (TLS 1.3 sends the server's verdict on
    the client certificate after the client's half of the handshake: it shows on the first read)."""
    ctx = ssl.create_default_context(cafile=str(gw.pki / "certs" / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                answer = tls.recv(4096)
    except (ssl.SSLError, OSError) as exc:
        return str(exc)
    return "ok" if answer.startswith(b"HTTP/1.1 200") else f"answer {answer[:60]!r}"


def s_client(gw: Gateway, cert: Path | None, key: Path | None) -> str:
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{gw.port}", "-servername", "localhost", "-tls1_3",
            "-CAfile", str(gw.pki / "certs" / "ca.pem"), "-ign_eof"]
    if cert is not None:
        args += ["-cert", str(cert), "-key", str(key)]
    out = subprocess.run(args, input=b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n", capture_output=True,
                         timeout=30)
    return (out.stdout + out.stderr).decode(errors="replace")


def test_a_revoked_certificate_fails_the_handshake_with_its_alert(crl_gateway: tuple[Gateway, Path]) -> None:
    gw, tmp = crl_gateway
    assert handshake(gw, gw.pki / "certs" / "client-demo.pem", gw.pki / "certs" / "client-demo.key") == "ok"
    assert "certificate revoked" in handshake(gw, tmp / "revoked.pem", tmp / "revoked.key").lower()
    out = s_client(gw, tmp / "revoked.pem", tmp / "revoked.key")
    assert "alert certificate revoked" in out, out
    assert "unknown ca" in handshake(gw, tmp / "stranger.pem", tmp / "stranger.key").lower()
    assert "alert unknown ca" in s_client(gw, tmp / "stranger.pem", tmp / "stranger.key")
    assert "certificate required" in handshake(gw, None, None).lower()
    assert "alert certificate required" in s_client(gw, None, None)


def test_a_changed_crl_is_picked_up_without_a_restart(crl_gateway: tuple[Gateway, Path]) -> None:
    gw, tmp = crl_gateway
    assert handshake(gw, tmp / "later.pem", tmp / "later.key") == "ok"
    ca = load_ca(gw.pki / "certs")
    later = x509.load_pem_x509_certificate((tmp / "later.pem").read_bytes())
    revoked = x509.load_pem_x509_certificate((tmp / "revoked.pem").read_bytes())
    write_crl(tmp / "ca.crl", ca, [revoked, later])  # now PEM, with one more
    deadline = time.monotonic() + 5
    while handshake(gw, tmp / "later.pem", tmp / "later.key") == "ok":
        assert time.monotonic() < deadline, "the new CRL was not picked up"
        time.sleep(0.2)
    assert "certificate revoked" in handshake(gw, tmp / "later.pem", tmp / "later.key").lower()
    assert handshake(gw, gw.pki / "certs" / "client-demo.pem", gw.pki / "certs" / "client-demo.key") == "ok"
    assert "certificate revocation lists reloaded" in gw.log.read_text()


def test_a_crl_that_is_missing_or_not_a_crl_is_a_configuration_error(tmp_path: Path, pki: Path) -> None:
    from gateway.config import ConfigError, load_config

    (tmp_path / "bad.crl").write_text("hello")
    config = tmp_path / "g.toml"
    config.write_text(f"""
[tls]
cert_file = "{pki}/certs/server.pem"
key_file = "{pki}/certs/server.key"
client_ca_file = "{pki}/certs/ca.pem"
crl_files = ["{tmp_path}/bad.crl", "{tmp_path}/absent.crl"]
[models.digits]
""")
    with pytest.raises(ConfigError) as info:
        load_config(config, environ={})
    assert "bad.crl is not a certificate revocation list" in str(info.value)
    assert "absent.crl: No such file" in str(info.value)


def _keep_alive(gw: Gateway, cert: Path, key: Path) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(gw.pki / "certs" / "ca.pem"))
    ctx.load_cert_chain(cert, key)
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _ask(tls: ssl.SSLSocket) -> bytes:
    """One request on an open connection; the answer's head (b"" once the server has closed it)."""
    tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = tls.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def test_an_open_connection_is_refused_once_its_certificate_is_revoked_or_expires(
        crl_gateway: tuple[Gateway, Path]) -> None:
    """A handshake checks the CRLs of its time and the certificate's dates; a keep-alive connection
    outlived both, served as before."""
    gw, tmp = crl_gateway
    ca = load_ca(gw.pki / "certs")
    kept = client_files(tmp, "kept-open", issue_certificate(ca, "kept-open", server=False,
                                                            uris=("spiffe://gateway.local/principal/demo",)))
    now = dt.datetime.now(dt.UTC)
    brief = client_files(tmp, "brief", issue_certificate(ca, "brief", server=False, days=1,
                                                         not_before=now - dt.timedelta(days=1, seconds=-5),
                                                         uris=("spiffe://gateway.local/principal/demo",)))
    with _keep_alive(gw, *kept) as tls, _keep_alive(gw, *brief) as short:
        assert _ask(tls).startswith(b"HTTP/1.1 200") and _ask(short).startswith(b"HTTP/1.1 200")
        earlier = [x509.load_pem_x509_certificate((tmp / f"{n}.pem").read_bytes()) for n in ("revoked", "later")]
        write_crl(tmp / "ca.crl", ca, [*earlier, x509.load_pem_x509_certificate(kept[0].read_bytes())])
        time.sleep(5.5)  # the CRL is looked at at most once a second; the brief certificate has expired
        answer = _ask(tls)
        assert answer.startswith(b"HTTP/1.1 401") and b"credential-revoked" in answer + tls.recv(4096)
        assert _ask(tls) == b"", "the connection is closed"
        answer = _ask(short)
        assert answer.startswith(b"HTTP/1.1 401")
    assert "certificate revocation lists reloaded" in gw.log.read_text()
    with _keep_alive(gw, gw.pki / "certs" / "client-demo.pem", gw.pki / "certs" / "client-demo.key") as other:
        assert _ask(other).startswith(b"HTTP/1.1 200") and _ask(other).startswith(b"HTTP/1.1 200")
