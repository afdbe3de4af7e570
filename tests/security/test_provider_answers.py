"""An external provider's discovery document and key set are read as untrusted input: one that is
not a JSON object, or larger than any key set, is a failed refresh (the cached keys stay, and the
reason is kept), never an exception on the request path or a download without end."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.config import IssuerTrust
from gateway.security import keysources
from gateway.security.keysources import JWKSCache

ANSWERS: dict[str, bytes] = {}


class _Provider(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/trickle":  # a byte every half second, each well within httpx's read timeout
            self.send_response(200)
            self.send_header("content-length", "1000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(60):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.5)
            return
        body = ANSWERS.get(self.path, b"{}")
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.anyio
@pytest.mark.parametrize("path,answer,reason", [
    ("/.well-known/openid-configuration", b"[]", "not a JSON object"),
    ("/.well-known/openid-configuration", b'"a string"', "not a JSON object"),
    ("/keys", b'{"keys": [], "padding": "' + b"x" * (3 << 20) + b'"}', "more than 1048576 bytes"),
], ids=["discovery-a-list", "discovery-a-string", "keys-of-3-mib"])
async def test_a_provider_answer_that_is_no_document_is_a_failed_refresh(provider: str, path: str, answer: bytes,
                                                                        reason: str) -> None:
    ANSWERS.clear()
    ANSWERS[path] = answer
    jwks_uri = f"{provider}/keys" if path == "/keys" else ""
    cache = JWKSCache(IssuerTrust(issuer=provider, jwks_uri=jwks_uri))
    assert await cache.refresh() is False
    assert reason in cache.last_error and cache.keys is None


@pytest.mark.anyio
async def test_a_provider_that_trickles_its_answer_is_a_failed_refresh_at_the_fetch_timeout(
        provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's timeout is per read: a provider sending a byte every half second held the refresh
    (and the gateway's start-up, which waits for it) for as long as it went on."""
    monkeypatch.setattr(keysources, "FETCH_TIMEOUT_S", 1.0, raising=False)
    cache = JWKSCache(IssuerTrust(issuer=provider, jwks_uri=f"{provider}/trickle"))
    started = time.monotonic()
    assert await cache.refresh() is False
    assert time.monotonic() - started < 3.0
    assert "took more than 1 s" in cache.last_error and cache.keys is None
