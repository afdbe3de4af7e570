"""The verified client certificate reaches the application as the connection's identity;
X-Forwarded-Client-Cert counts only from trusted proxies."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.config import TLSConfig
from gateway.context import SCOPE_KEY
from gateway.middleware.context import ContextMiddleware
from gateway.security.tls import build_server_context
from gateway.security.xfcc import TrustedProxies, parse_xfcc
from gateway.server import TLSHttpToolsProtocol
from tests.conftest import client_context, free_port

FAKE_HASH = "ab" * 32


async def echo_identity(scope: dict[str, Any], receive: Any, send: Any) -> None:
    ctx = scope[SCOPE_KEY]
    body = orjson.dumps({"peer": ctx.peer.as_dict() if ctx.peer else None,
                         "xfcc_seen": any(n == b"x-forwarded-client-cert" for n, _ in scope["headers"])})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _serve(pki: Path, trusted: tuple[str, ...]) -> Iterator[str]:
    tls = TLSConfig(cert_file=str(pki / "certs/server.pem"), key_file=str(pki / "certs/server.key"),
                    client_ca_file=str(pki / "certs/ca.pem"))
    port = free_port()
    app = ContextMiddleware(echo_identity, TrustedProxies(trusted), timeout_s=5)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=TLSHttpToolsProtocol, lifespan="off",
                            log_level="warning", ssl_keyfile=tls.key_file, ssl_certfile=tls.cert_file)
    config.load()
    config.ssl = build_server_context(tls)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"https://localhost:{port}"
    server.should_exit = True
    thread.join(5)


@pytest.fixture(scope="module")
def untrusting(pki: Path) -> Iterator[str]:
    yield from _serve(pki, ())


@pytest.fixture(scope="module")
def trusting(pki: Path) -> Iterator[str]:
    yield from _serve(pki, ("127.0.0.0/8",))


def test_certificate_identity_reaches_the_app(pki: Path, untrusting: str) -> None:
    der = x509.load_pem_x509_certificate((pki / "certs/client-demo.pem").read_bytes()).public_bytes(Encoding.DER)
    with httpx.Client(verify=client_context(pki, "demo")) as c:
        peer = c.get(untrusting).json()["peer"]
    assert peer["subject"] == "CN=demo,O=Gateway Development"
    assert peer["sans"] == ["URI:spiffe://gateway.local/principal/demo"]
    assert peer["fingerprint_sha256"] == hashlib.sha256(der).hexdigest()
    assert peer["source"] == "tls"
    with httpx.Client(verify=client_context(pki, "admin")) as c:
        assert c.get(untrusting).json()["peer"]["subject"] == "CN=admin,O=Gateway Development"


def test_xfcc_from_an_untrusted_peer_is_ignored_and_stripped(pki: Path, untrusting: str) -> None:
    with httpx.Client(verify=client_context(pki, "demo")) as c:
        doc = c.get(untrusting, headers={"x-forwarded-client-cert": f'Hash={FAKE_HASH};Subject="CN=root"'}).json()
    assert doc["peer"]["subject"] == "CN=demo,O=Gateway Development"
    assert doc["xfcc_seen"] is False


ALICE = f'By=spiffe://ingress;Hash={FAKE_HASH};Subject="CN=alice,O=Org";URI=spiffe://x/alice'
FORGED = f'Hash={"cd" * 32};Subject="CN=admin";URI=spiffe://x/admin'
ALICE_PEER = {"subject": "CN=alice,O=Org", "sans": ["URI:spiffe://x/alice"], "fingerprint_sha256": FAKE_HASH,
              "source": "xfcc"}


@pytest.mark.parametrize("header", [ALICE, f"{FORGED},{ALICE}"], ids=["proxy-sets-the-header", "proxy-appends"])
def test_xfcc_from_a_trusted_proxy_names_the_client_it_saw(pki: Path, trusting: str, header: str) -> None:
    """A proxy that sets the header sends one element; one that appends adds its client's element
    after whatever the client itself sent (here a forged admin element): the proxy's counts."""
    with httpx.Client(verify=client_context(pki, "demo")) as c:
        peer = c.get(trusting, headers={"x-forwarded-client-cert": header}).json()["peer"]
    assert peer == ALICE_PEER


def test_xfcc_hops_count_the_trusted_proxies_that_append() -> None:
    mesh = f'Hash={"ef" * 32};Subject="CN=edge-proxy"'  # a second trusted proxy appended the edge's own element
    assert parse_xfcc(f"{FORGED},{ALICE},{mesh}", hops=2).as_dict() == ALICE_PEER  # type: ignore[union-attr]
    assert parse_xfcc(ALICE, hops=2) is None  # fewer elements than trusted proxies: no identity at all


@pytest.mark.parametrize("value", ["", "Subject=x", "Hash=abc", 'Hash="' + "g" * 64 + '"x'])
def test_malformed_xfcc_gives_no_identity(value: str) -> None:
    assert parse_xfcc(value) is None


def test_trusted_proxies_match_addresses_and_networks() -> None:
    t = TrustedProxies(["10.0.0.0/8", "::1"])
    assert t.trusts("10.1.2.3") and t.trusts("::1")
    assert not t.trusts("192.168.0.1") and not t.trusts("not-an-ip") and not t.trusts(None)
