"""The built-in OAuth 2 issuer: discovery, JWKS and a token endpoint served by the gateway itself.

So that one machine needs no external identity provider. Grants (authlib's, behind a thin
Starlette adapter of ours):

- ``client_credentials`` for services; client secrets are stored only as scrypt hashes.
- ``password`` for people, with an extra ``totp`` parameter: with a valid one-time code the token
  carries ``amr: ["pwd", "otp", "mfa"]`` and ``acr: urn:gateway:acr:mfa``; without it,
  ``amr: ["pwd"]`` and ``acr: urn:gateway:acr:pwd``, which step-up rules can refuse (RFC 9470).

Tokens are RFC 9068 JWTs (``typ: at+jwt``), ES256, short-lived (``issuer.token_ttl_s``), with a
``jti``; requested over mTLS they are bound to the client certificate (``cnf.x5t#S256``, RFC 8705).
Failed sign-ins are counted per factor, and each counter is cleared only by a success of that
factor: after ``issuer.max_failed_logins`` failed secrets (a client's or a person's password) or
``issuer.max_failed_otp`` wrong one-time codes, the account is locked for up to
``issuer.lockout_s`` (NIST SP 800-63B allows at most 100), so a known password cannot be used to
reset the count of guessed codes. Attempts in flight count with the failures (a place is taken
before a secret or code is judged), so guesses sent together get no more tries than the limit,
and at most ``issuer.sign_in_threads`` sign-ins are judged at once. The counters live in the rate
limiter's storage, so replicas sharing Redis share them. A client authenticates one way only
(RFC 6749 section 2.3): a Basic header together with credentials in the form is refused before
anything is counted (``gateway.security.tokenrequest``). An unknown client and a wrong secret get
the same answer after the same work (one scrypt), so client ids cannot be enumerated.

The store (signing keys, clients, people) is ``gateway.security.accounts``; the HTTP endpoints
are ``gateway.endpoints.issuer``. Nothing here knows a web framework.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio.from_thread
import anyio.to_thread
from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, OAuth2Request
from authlib.oauth2.rfc6749.errors import InvalidGrantError
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant, ResourceOwnerPasswordCredentialsGrant
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from cryptography.hazmat.primitives.twofactor import InvalidToken as InvalidTOTP
from joserfc.jwk import KeySet

from gateway.config import ACR_MFA, ACR_PASSWORD, Config
from gateway.cpus import available_cpus
from gateway.security.accounts import (
    TOTP_STEP,
    IssuerStore,
    enrolment_uri,
    hash_secret,
    new_totp_secret,
    totp,
    totp_now,
    unknown_account_hash,
    verify_secret,
)
from gateway.security.incidents import IncidentStore
from gateway.security.ratelimit import Charge, Limiter
from gateway.security.tokenrequest import Outcome, TokenRequest, claimed_client_id, locked_answer, verdicts_of

__all__ = [
    "JWKS_PATH", "TOKEN_PATH", "BuiltinIssuer", "IssuerStore", "enrolment_uri", "hash_secret",
    "new_totp_secret", "totp_now", "verify_secret",
]

log = logging.getLogger("gateway.issuer")

TOKEN_PATH = "/oauth/token"
JWKS_PATH = "/oauth/jwks"
CLI_CLIENT = "gateway-cli"
"""The public client people sign in through (no secret: it stands for whatever program they use)."""

# -- authlib adapters -----------------------------------------------------------------------------

@dataclass
class _User:
    username: str
    roles: list[str]
    amr: list[str]
    acr: str
    auth_time: int

    def get_user_id(self) -> str:
        return self.username


@dataclass
class _Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    record: dict[str, Any]
    public: bool = False

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        return ""  # access is decided by roles, not scopes

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        # A client that does not exist is checked against a hash nobody knows the secret of: the
        # same work and the same refusal as a wrong secret.
        return not self.public and verify_secret(client_secret, self.record.get("secret_hash") or unknown_account_hash())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.public:
            return method == "none"
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.record.get("grants", ())


_peer_thumbprint: contextvars.ContextVar[str | None] = contextvars.ContextVar("peer_thumbprint", default=None)


class _TokenGenerator(JWTBearerTokenGenerator):  # type: ignore[misc]
    def __init__(self, issuer: BuiltinIssuer) -> None:
        super().__init__(issuer.url, alg="ES256", expires_generator=lambda client, grant: issuer.ttl)
        self.gateway_issuer = issuer

    def get_jwks(self) -> KeySet:
        return self.gateway_issuer.store.current_key()

    def get_audiences(self, client: _Client, user: _User | None, scope: str) -> str:
        return self.gateway_issuer.audience

    def get_auth_time(self, user: _User | None) -> int | None:
        return user.auth_time if user else None

    def get_amr(self, user: _User | None) -> list[str] | None:
        return user.amr if user else None

    def get_acr(self, user: _User | None) -> str | None:
        return user.acr if user else None

    def get_extra_claims(self, client: _Client, grant_type: str, user: _User | None, scope: str) -> dict[str, Any]:
        claims: dict[str, Any] = {"roles": user.roles if user else list(client.record.get("roles", []))}
        thumbprint = _peer_thumbprint.get()
        if thumbprint:
            claims["cnf"] = {"x5t#S256": thumbprint}
        return claims


class BuiltinIssuer:
    def __init__(self, config: Config, limiter: Limiter | None = None, incidents: IncidentStore | None = None) -> None:
        self.incidents = incidents
        self.url = config.issuer_url
        self.audience = config.audience
        self.ttl = config.issuer.token_ttl_s
        self.store = IssuerStore(config.issuer.directory)
        self.limiter = limiter or Limiter(config.limits, config.issuer.max_failed_logins, config.issuer.lockout_s)
        self.max_failed_otp = config.issuer.max_failed_otp
        self._used_codes: dict[str, int] = {}  # last accepted TOTP step per user: no replays (and Redis)
        self._codes_lock = threading.Lock()
        self.sign_in_threads = config.issuer.sign_in_threads or max(1, available_cpus() // 2)
        self._judging: anyio.CapacityLimiter | None = None  # made in the event loop, on first use
        self.server = self._authorization_server()

    def _authorization_server(self) -> AuthorizationServer:
        issuer = self

        class Server(AuthorizationServer):  # type: ignore[misc]
            def query_client(self, client_id: str) -> _Client | None:
                if client_id == CLI_CLIENT:
                    return _Client(CLI_CLIENT, {"grants": ["password"]}, public=True)
                record = issuer.store.clients().get(client_id)
                # Unknown: a stand-in that fails its secret check like a wrong secret does.
                return _Client(client_id, record or {"grants": []})

            def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
                pass  # self-contained JWTs: nothing to store

            def create_oauth2_request(self, request: TokenRequest) -> TokenRequest:
                return request

            def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, Any]:
                return status, body, headers

            def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
                pass


        class ClientCredentials(ClientCredentialsGrant):  # type: ignore[misc]
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

        class Password(ResourceOwnerPasswordCredentialsGrant):  # type: ignore[misc]
            TOKEN_ENDPOINT_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post"]

            def authenticate_user(self, username: str, password: str) -> _User:
                return issuer.login(username, password, self.request.form.get("totp"), self.request.outcome)

        server = Server()
        server.register_grant(ClientCredentials)
        server.register_grant(Password)
        server.register_token_generator("default", _TokenGenerator(self))
        return server

    def login(self, username: str, password: str, code: str | None, outcome: Outcome | None = None) -> _User:
        outcome = outcome or Outcome()
        record = self.store.users().get(username)
        ok = verify_secret(password, record["password_hash"] if record else unknown_account_hash()) and record is not None
        outcome.password = ok
        amr, acr = ["pwd"], ACR_PASSWORD
        if ok and code:
            assert record is not None
            outcome.locked, outcome.busy = anyio.from_thread.run(self.limiter.account_attempt, f"otp:{username[:256]}",
                                                                 self.max_failed_otp)
            outcome.trying_otp = not outcome.locked
            ok = outcome.otp = outcome.trying_otp and self._check_totp(username, record["totp_secret"], code)
            amr, acr = ["pwd", "otp", "mfa"], ACR_MFA
        if not ok or record is None:
            raise InvalidGrantError("invalid username, password or one-time code")
        return _User(username, list(record.get("roles", [])), amr, acr, int(time.time()))

    def _check_totp(self, username: str, secret: str, code: str) -> bool:
        if not (code.isdigit() and len(code) == 6):
            return False
        now = int(time.time())
        generator = totp(secret)
        for offset in (0, -TOTP_STEP, TOTP_STEP):  # one step of clock drift either way
            at = now + offset
            try:
                generator.verify(code.encode(), at)
            except InvalidTOTP:
                continue
            step = at // TOTP_STEP
            with self._codes_lock:  # sign-ins are judged in several threads
                if self._used_codes.get(username, -1) >= step:
                    return False  # a code is good for one sign-in only
                self._used_codes[username] = step
            if self.limiter.shared is not None:  # nor on another replica (runs in the grant's thread)
                return anyio.from_thread.run(self.limiter.first_use, f"totp/{username}/{step}", 3 * TOTP_STEP)
            return True
        return False

    def _issue(self, oauth_request: TokenRequest, thumbprint: str | None) -> tuple[int, Any, Any]:
        _peer_thumbprint.set(thumbprint)
        return self.server.create_token_response(oauth_request)  # type: ignore[no-any-return]

    async def respond(self, url: str, headers: Mapping[str, str], form: dict[str, str], thumbprint: str | None,
                      address: str | None = None) -> tuple[int, Any, list[tuple[str, str]]]:
        """One token request: how the client authenticates, the accounts' lockouts, then the grant
        (in a thread: scrypt is slow), then each factor's count. With ``address``, its refusals
        count against that address's failed-auth limit, checked and counted while the request holds
        its place among the sign-ins being judged."""
        request = TokenRequest(url, headers, form)
        status, payload, out = await self._respond(request, thumbprint, address)
        if address is not None and status in (400, 401) and not request.outcome.counted:
            await self.limiter.count((Charge(self.limiter.failed_auth, address),))
        return status, payload, out

    async def _respond(self, request: TokenRequest, thumbprint: str | None,
                       address: str | None) -> tuple[int, Any, list[tuple[str, str]]]:
        form = request.form
        try:
            client_id = claimed_client_id(request)
        except ValueError as exc:  # malformed, or more than one way of authenticating
            return 400, {"error": "invalid_request", "error_description": str(exc)}, []
        revoked = self._revoked(client_id, form)
        if revoked is not None:  # an operator's revocation: no token, whatever the secret
            return 400, {"error": "invalid_grant", "error_description": revoked}, []
        counters = self._counters(request, client_id)
        for key, limit in counters.values():  # any factor locked locks the account
            wait = await self.limiter.account_locked(key, limit)
            if wait:
                return locked_answer(wait)
        first, (key, limit) = next(iter(counters.items()))
        wait, busy = await self.limiter.account_attempt(key, limit)  # in flight counts with the failures
        if wait:
            return locked_answer(wait, busy)
        outcome, verdicts = request.outcome, {}
        try:
            if self._judging is None:
                self._judging = anyio.CapacityLimiter(self.sign_in_threads)
            async with self._judging:  # the address's limit, checked and counted in the same place
                if address is not None:
                    await self.limiter.exceeded(self.limiter.failed_auth, address)
                status, payload, out = await anyio.to_thread.run_sync(self._issue, request, thumbprint)
                if address is not None and status in (400, 401):
                    await self.limiter.count((Charge(self.limiter.failed_auth, address),))
                    outcome.counted = True
            verdicts = verdicts_of(counters, outcome, status)
        finally:
            await self.limiter.account_judged(key, verdicts.get(first), limit)
            if outcome.trying_otp:  # the code's own place, taken when it was about to be judged
                await self.limiter.account_judged(counters["otp"][0], verdicts.get("otp"), counters["otp"][1])
        if outcome.locked:
            return locked_answer(outcome.locked, outcome.busy)
        return status, payload, list(out or [])

    def _revoked(self, client_id: str, form: dict[str, str]) -> str | None:
        """An operator revoked the principal this request is for (its certificate is checked by the endpoint)."""
        controls = self.incidents.controls if self.incidents is not None else None
        if controls is None or controls.empty:
            return None
        subject = form.get("username", "") if form.get("grant_type") == "password" else client_id
        if f"{self.url}|{subject}" in controls.principals:
            return "this principal is revoked"
        return None

    def _counters(self, request: TokenRequest, client_id: str) -> dict[str, tuple[str, int]]:
        """The failure counters a token request may touch, by factor: (storage key, lockout threshold)."""
        if request.form.get("grant_type") == "password":
            user = request.form.get("username", "")[:256]
            return {"password": (f"user:{user}", self.limiter.max_failed_logins),
                    "otp": (f"otp:{user}", self.max_failed_otp)}
        return {"client": (f"client:{client_id[:256]}", self.limiter.max_failed_logins)}

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "token_endpoint": self.url + TOKEN_PATH,
            "jwks_uri": self.url + JWKS_PATH,
            "grant_types_supported": ["client_credentials", "password"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "response_types_supported": [],
            "scopes_supported": [],
            "acr_values_supported": [ACR_PASSWORD, ACR_MFA],
            "tls_client_certificate_bound_access_tokens": True,
            "access_token_signing_alg_values_supported": ["ES256"],
        }
