"""Where the SDK's bearer tokens come from: client credentials (authlib), a fixed token, or a callable."""

from __future__ import annotations

import ssl
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway_client.errors import AuthenticationError

__all__ = ["ClientCredentials", "PasswordSignIn", "StaticToken", "TokenSource", "totp_code"]


class TokenSource:
    """Gives the current token; ``invalidate`` after the gateway called it ``invalid_token``."""

    def token(self) -> str:
        raise NotImplementedError

    def invalidate(self) -> None:
        """Forget the current token so the next ``token()`` gets a new one (if the source can)."""

    @property
    def refreshable(self) -> bool:
        return False


@dataclass
class StaticToken(TokenSource):
    value: str

    def token(self) -> str:
        return self.value


@dataclass
class CallableToken(TokenSource):
    """Any ``() -> str``: the caller's own token logic (a secrets manager, a sidecar...)."""

    call: Callable[[], str]

    def token(self) -> str:
        return self.call()

    def invalidate(self) -> None:
        pass

    @property
    def refreshable(self) -> bool:
        return True  # the callable may well return a new token next time


@dataclass
class ClientCredentials(TokenSource):
    """OAuth 2 client credentials (RFC 6749 section 4.4) through authlib, cached until shortly
    before expiry (``refresh_leeway_s``), fetched over the same mTLS as the calls (so the token
    is bound to the client certificate)."""

    token_url: str
    client_id: str
    client_secret: str
    ssl_context: ssl.SSLContext | None = None
    refresh_leeway_s: float = 60.0
    clock: Callable[[], float] = time.time
    fetches: int = 0
    _token: str | None = field(default=None, repr=False)
    _expires_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def token(self) -> str:
        with self._lock:
            if self._token is None or self.clock() >= self._expires_at - self.refresh_leeway_s:
                self._fetch()
            assert self._token is not None
            return self._token

    def _fetch(self) -> None:
        import authlib.deprecate  # noqa: F401 - it installs an "always" filter of its own; ours must come after

        with warnings.catch_warnings():
            # authlib 1.9 would rather run on the "httpx2" fork and says so once; httpx is what we ship.
            warnings.filterwarnings("ignore", message="The httpx module is deprecated", category=DeprecationWarning)
            from authlib.integrations.httpx_client import OAuth2Client

        from authlib.integrations.base_client import OAuthError

        with OAuth2Client(self.client_id, self.client_secret, token_endpoint_auth_method="client_secret_basic",
                          verify=self.ssl_context if self.ssl_context is not None else True, timeout=30) as oauth:
            try:
                issued: dict[str, Any] = oauth.fetch_token(self.token_url, grant_type="client_credentials")
            except OAuthError as exc:  # the token endpoint refused: say so as the gateway's errors do
                raise AuthenticationError(401, {"type": f"urn:gateway:problem:oauth-{exc.error}",
                                                "title": "Token request refused",
                                                "detail": exc.description or exc.error}) from None
        self.fetches += 1
        self._token = str(issued["access_token"])
        self._expires_at = self.clock() + float(issued.get("expires_in", 300))

    def set_token(self, token: str, expires_at: float) -> None:
        """Seed the cache (a token obtained elsewhere)."""
        with self._lock:
            self._token, self._expires_at = token, expires_at

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    @property
    def refreshable(self) -> bool:
        return True


def totp_code(secret_b32: str) -> str:
    """The current RFC 6238 code (SHA-1, 6 digits, 30 s) of an enrolled secret."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    return TOTP(base64.b32decode(secret_b32), 6, hashes.SHA1(), 30).generate(int(time.time())).decode()


@dataclass
class PasswordSignIn(TokenSource):
    """A person of the built-in issuer: password and a TOTP code (the OAuth 2 password grant as
    the ``gateway-cli`` client, which the issuer accepts only with the second factor for ``admin:*``
    verbs). ``totp`` returns the current code: computed from an enrolled secret, or asked for."""

    token_url: str
    username: str
    password: str = field(repr=False)
    totp: Callable[[], str] | None = None
    ssl_context: ssl.SSLContext | None = None
    _token: str | None = field(default=None, repr=False)

    def token(self) -> str:
        if self._token is None:
            form = {"grant_type": "password", "client_id": "gateway-cli", "username": self.username,
                    "password": self.password}
            if self.totp is not None:
                form["totp"] = self.totp()
            response = httpx.post(self.token_url, data=form, verify=self.ssl_context or True, timeout=30)
            if response.status_code != 200:
                try:
                    problem = response.json()
                except ValueError:
                    problem = {"detail": response.text[:500]}
                raise AuthenticationError(response.status_code, problem if isinstance(problem, dict) else {})
            self._token = str(response.json()["access_token"])
        return self._token

    def invalidate(self) -> None:
        self._token = None

    @property
    def refreshable(self) -> bool:
        return True
