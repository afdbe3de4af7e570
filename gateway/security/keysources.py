"""Where a token's verification key comes from: an external provider's key set, fetched and cached
(``JWKSCache``), or the built-in issuer's own keys (``LocalKeys``).

Keys of an external provider are fetched by OIDC discovery or from an explicit ``jwks_uri`` and
cached. An unknown ``kid`` refetches at most once per ``jwks_refresh_s``; while the provider is
down, the cached keys keep serving until ``jwks_ttl_s`` has passed since the last successful
fetch, then requests get 503: never is a token accepted unverified. Only public asymmetric
signing keys are kept from a key set, and a provider's answers are read as any input: bounded in
size and in time.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

from gateway.config import IssuerTrust
from gateway.errors import Unauthorized, Unavailable

__all__ = ["FETCH_TIMEOUT_S", "MAX_PROVIDER_DOCUMENT_BYTES", "JWKSCache", "LocalKeys"]

log = logging.getLogger("gateway.auth")

MAX_PROVIDER_DOCUMENT_BYTES = 1024 * 1024
"""A discovery document or a key set: a few KiB where real."""
FETCH_TIMEOUT_S = 10.0
"""A refresh of a provider's keys (discovery and key set) ends after this long, however the bytes come."""


async def _document(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """A provider's JSON object at ``url``, read up to ``MAX_PROVIDER_DOCUMENT_BYTES``; ``ValueError``
    for anything else (a provider's answers are input like any other)."""
    async with http.stream("GET", url) as response:
        response.raise_for_status()
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_PROVIDER_DOCUMENT_BYTES:
                raise ValueError(f"{url} answered more than {MAX_PROVIDER_DOCUMENT_BYTES} bytes")
    doc = orjson.loads(bytes(body))
    if not isinstance(doc, dict):
        raise ValueError(f"{url} answered {type(doc).__name__}, not a JSON object")
    return doc


def _public_signing_keys(data: Any) -> KeySet:
    """Import a JWKS keeping only public asymmetric signing keys (never ``oct``, never ``use: enc``)."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK Set")
    keys = []
    for entry in data["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP") or entry.get("use", "sig") != "sig":
            continue
        public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
        keys.append(public)
    return KeySet.import_key_set({"keys": keys})


class JWKSCache:
    """One external provider's signing keys, fetched over HTTPS (or loopback HTTP) and cached."""

    def __init__(self, trust: IssuerTrust, clock: Callable[[], float] = time.monotonic) -> None:
        self.trust = trust
        self.clock = clock
        self.keys: KeySet | None = None
        self.fetched_at = -1e18
        self.attempted_at = -1e18
        self.jwks_uri = trust.jwks_uri
        self.last_error = ""
        self.fetch_errors = 0
        self._lock = asyncio.Lock()

    def _client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if self.trust.ca_file:
            verify = ssl.create_default_context(cafile=self.trust.ca_file)
        return httpx.AsyncClient(verify=verify, timeout=5.0, follow_redirects=False, trust_env=False)

    async def _fetch(self) -> KeySet:
        async with self._client() as http:
            if not self.jwks_uri:
                url = self.trust.issuer.rstrip("/") + "/.well-known/openid-configuration"
                doc = await _document(http, url)
                if doc.get("issuer") != self.trust.issuer:
                    raise ValueError(f"discovery names issuer {doc.get('issuer')!r}, expected {self.trust.issuer!r}")
                if not isinstance(doc.get("jwks_uri"), str):
                    raise ValueError("discovery document has no jwks_uri")
                self.jwks_uri = doc["jwks_uri"]
            return _public_signing_keys(await _document(http, self.jwks_uri))

    async def refresh(self) -> bool:
        """Fetch now (single-flight); False, with the cache untouched, when the provider fails."""
        async with self._lock:
            self.attempted_at = self.clock()
            try:
                async with asyncio.timeout(FETCH_TIMEOUT_S):  # httpx's timeout is per read: a trickle never ends it
                    self.keys = await self._fetch()
            except (httpx.HTTPError, ValueError, JoseError, TimeoutError) as exc:
                self.last_error = (f"the provider took more than {FETCH_TIMEOUT_S:.0f} s to answer"
                                   if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}")
                self.fetch_errors += 1
                log.warning("cannot fetch the keys of %s: %s", self.trust.issuer, self.last_error)
                return False
            self.fetched_at = self.clock()
            self.last_error = ""
            return True

    def fresh(self) -> bool:
        return self.keys is not None and self.clock() - self.fetched_at <= self.trust.jwks_ttl_s

    def _may_retry(self) -> bool:
        return self.clock() - self.attempted_at >= self.trust.jwks_refresh_s

    async def key(self, kid: str | None, alg: str) -> Key:
        if not self.fresh():
            if self._may_retry() or self.keys is None and self.attempted_at < 0:
                await self.refresh()
            if not self.fresh():
                raise Unavailable(f"the keys of issuer {self.trust.issuer} cannot be fetched; "
                                  "no token of it can be verified now",
                                  retry_after=max(1, int(self.trust.jwks_refresh_s)))
        found = _find(self.keys, kid, alg)
        if found is None and self._may_retry() and await self.refresh():
            found = _find(self.keys, kid, alg)
        if found is None:
            raise Unauthorized(f"no key {kid!r} among the issuer's signing keys")
        return found

    def current(self) -> KeySet | None:
        """The key set now trusted (None while stale): a new fetch is a new object."""
        return self.keys if self.fresh() else None

    def status(self) -> dict[str, Any]:
        return {"issuer": self.trust.issuer, "keys": len(self.keys.keys) if self.keys else 0,
                "fresh": self.fresh(), "error": self.last_error, "fetch_errors": self.fetch_errors}


class LocalKeys:
    """The built-in issuer's public keys, read from its store (no network)."""

    def __init__(self, load: Callable[[], KeySet]) -> None:
        self.load = load

    def current(self) -> KeySet:
        return self.load()

    async def key(self, kid: str | None, alg: str) -> Key:
        found = _find(self.load(), kid, alg)
        if found is None:
            raise Unauthorized(f"no key {kid!r} among the issuer's signing keys")
        return found


def _find(keys: KeySet | None, kid: str | None, alg: str) -> Key | None:
    if keys is None:
        return None
    candidates = [k for k in keys.keys if (kid is None or k.kid == kid)]
    candidates = [k for k in candidates if k.get("alg") in (None, alg)]
    if kid is None and len(candidates) != 1:
        return None  # without a kid the key must be unambiguous
    return candidates[0] if candidates else None
