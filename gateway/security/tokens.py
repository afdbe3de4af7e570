"""Bearer access tokens (RFC 9068 JWTs) in, a ``Principal`` out.

Order of checks, each failure a 401 ``invalid_token``: size and shape; the header (algorithm on
the allow-list, no key named by the token: ``jku``, ``x5u``, ``jwk``, ``x5c``); the issuer (one of
the configured ones, read from the still-unverified payload only to pick its key set); ``typ``;
the key, by ``kid``, from that issuer's own JWKS and nowhere else; the signature; the claims
(``iss``, ``aud``, ``exp``, ``nbf``, ``iat``, ``sub`` with bounded leeway); and, when the token is
certificate-bound (RFC 8705), the presented client certificate's thumbprint.

A token that passed every check is remembered for ``VERIFIED_TTL_S`` (as Envoy's jwt_authn
caches verified tokens), with the principal it stands for: a signature check costs about 80 µs,
most of a request's budget on a small model, and parsing and checking the claims again another
30. The memory holds only while the issuer's key set is the same object (a rotation, a refetch or
stale keys end it); the claims that depend on the time (``exp``, ``nbf``, ``iat``) and the
certificate binding are checked on every request.

The keys come from ``gateway.security.keysources``: an external provider's, fetched and cached,
or the built-in issuer's own.
"""

from __future__ import annotations

import base64
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from joserfc import jws, jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import Key, KeySet

from gateway.config import Config, IssuerTrust
from gateway.errors import Unauthorized
from gateway.security.keysources import JWKSCache, LocalKeys
from gateway.security.types import PeerIdentity, Principal

__all__ = ["JWKSCache", "TokenValidator", "bearer_token", "cert_thumbprint", "roles_from_claims"]

log = logging.getLogger("gateway.auth")

MAX_TOKEN_BYTES = 8192
VERIFIED_TTL_S = 30.0
"""A token whose signature verified is not verified again for this long (its claims always are)."""
VERIFIED_MAX = 10_000
FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of a single ``Authorization: Bearer`` header; 401 for anything ambiguous."""
    values = [v for n, v in headers if n == b"authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthorized("more than one Authorization header", error="invalid_request")
    scheme, _, token = values[0].decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized(f"the Authorization scheme must be Bearer, not {scheme[:16]!r}", error="invalid_request")
    token = token.strip()
    if not token:
        raise Unauthorized("empty bearer token", error="invalid_request")
    return token


def cert_thumbprint(peer: PeerIdentity) -> str:
    """RFC 8705 ``x5t#S256``: base64url of the certificate's SHA-256, unpadded."""
    return base64.urlsafe_b64encode(bytes.fromhex(peer.fingerprint_sha256)).rstrip(b"=").decode()


def _claim_path(claims: dict[str, Any], path: str) -> Any:
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def roles_from_claims(claims: dict[str, Any], paths: tuple[str, ...]) -> frozenset[str]:
    roles: set[str] = set()
    for path in paths:
        value = _claim_path(claims, path)
        if isinstance(value, str):
            roles.update(value.split())  # "scope" is space-separated (RFC 6749 section 3.3)
        elif isinstance(value, list):
            roles.update(v for v in value if isinstance(v, str))
    return frozenset(roles)


def _b64json(segment: bytes) -> Any:
    return orjson.loads(base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4)))


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token that passed every check: when, against which key set, and what it stands for."""

    at: float
    keys: KeySet | None
    source: JWKSCache | LocalKeys
    trust: IssuerTrust
    principal: Principal
    bound: str | None
    exp: float
    iat: float
    nbf: float | None


class TokenValidator:
    """Validates bearer tokens against the built-in issuer and every ``[[auth.issuers]]`` entry."""

    def __init__(self, config: Config, builtin_keys: Callable[[], KeySet] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.leeway = config.auth.leeway_s
        self.clock = clock
        self._verified: dict[str, _Verified] = {}
        self.trusts: dict[str, tuple[IssuerTrust, JWKSCache | LocalKeys]] = {}
        if config.issuer.enabled and builtin_keys is not None:
            builtin = IssuerTrust(issuer=config.issuer_url, audience=config.audience, roles_claims=("roles",))
            self.trusts[builtin.issuer] = (builtin, LocalKeys(builtin_keys))
        for trust in config.auth.issuers:
            if not trust.audience:
                trust = IssuerTrust(**{**trust.__dict__, "audience": config.audience})
            self.trusts[trust.issuer] = (trust, JWKSCache(trust))

    def caches(self) -> list[JWKSCache]:
        return [source for _, source in self.trusts.values() if isinstance(source, JWKSCache)]

    async def authenticate(self, token: str, peer: PeerIdentity | None) -> Principal:
        known = self._verified.get(token)
        if known is not None and time.monotonic() - known.at < VERIFIED_TTL_S and known.keys is known.source.current():
            # verified moments ago against the same key set, so its header and claims passed every
            # check that does not depend on the time; those that do, and the binding, are made again
            self._check_times(known)
            self._check_binding(known.bound, known.trust, peer)
            return known.principal
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthorized(f"token longer than {MAX_TOKEN_BYTES} bytes")
        raw = token.encode("ascii", "replace")
        parts = raw.split(b".")
        if len(parts) != 3:
            raise Unauthorized("not a signed JWT (expected three dot-separated parts)")
        try:
            header, unverified = _b64json(parts[0]), _b64json(parts[1])
        except (ValueError, orjson.JSONDecodeError):
            raise Unauthorized("malformed token") from None
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            raise Unauthorized("malformed token")
        alg = header.get("alg")
        named = [h for h in FORBIDDEN_HEADERS if h in header]
        if named:
            raise Unauthorized(f"tokens may not name their own keys ({', '.join(named)}); "
                               "keys come only from the issuer's configured JWKS")
        issuer = unverified.get("iss")
        entry = self.trusts.get(issuer) if isinstance(issuer, str) else None
        if entry is None:
            raise Unauthorized("the token's issuer is not trusted")
        trust, source = entry
        if alg not in trust.algorithms:
            raise Unauthorized(f"algorithm {str(alg)[:16]!r} is not accepted (allowed: {', '.join(trust.algorithms)})")
        typ = str(header.get("typ", "")).lower().removeprefix("application/")
        if trust.typ and typ != trust.typ:
            raise Unauthorized(f"token type {typ or 'none'!r} is not {trust.typ!r} (RFC 9068 access token)")
        kid = header.get("kid")
        keys = source.current()
        key = await source.key(kid if isinstance(kid, str) else None, alg)
        if source.current() is not keys:
            keys = None  # refetched meanwhile: the next request verifies against the new set
        claims = self._verify_signature(raw, key, trust)
        self._check_claims(claims, trust)
        cnf = claims.get("cnf")
        bound = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        self._check_binding(bound, trust, peer)
        principal = self._principal(claims, trust, bound is not None)
        if keys is not None:
            if len(self._verified) >= VERIFIED_MAX:
                self._verified.clear()
            self._verified[token] = _Verified(
                time.monotonic(), keys, source, trust, principal, bound, float(claims["exp"]),
                float(claims["iat"]), float(claims["nbf"]) if isinstance(claims.get("nbf"), (int, float)) else None)
        return principal

    def _check_times(self, known: _Verified) -> None:
        """``exp``, ``nbf`` and ``iat`` against the clock, as the claims registry checks them."""
        now = int(self.clock())
        if known.exp <= now - self.leeway:
            raise Unauthorized("the token has expired")
        if known.nbf is not None and known.nbf > now + self.leeway:
            raise Unauthorized("the token's claims are not valid: The token is not yet valid")
        if known.iat > now + self.leeway:
            raise Unauthorized("the token's claims are not valid: The token was issued in the future")

    @staticmethod
    def _check_binding(bound: str | None, trust: IssuerTrust, peer: PeerIdentity | None) -> None:
        """RFC 8705: a certificate-bound token only with the certificate it is bound to."""
        if bound is not None or trust.require_cert_binding:
            if bound is None:
                raise Unauthorized("this issuer's tokens must be bound to a client certificate (cnf.x5t#S256)")
            if peer is None or cert_thumbprint(peer) != bound:
                raise Unauthorized("the token is bound to another client certificate")

    def _verify_signature(self, raw: bytes, key: Key, trust: IssuerTrust) -> dict[str, Any]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # joserfc's notice that "EdDSA" is superseded by "Ed25519"
                obj = jws.deserialize_compact(raw, key, algorithms=list(trust.algorithms))
        except BadSignatureError:
            raise Unauthorized("the token's signature does not verify") from None
        except (JoseError, ValueError) as exc:
            raise Unauthorized(f"the token cannot be verified: {exc}") from None
        try:
            claims = orjson.loads(obj.payload or b"")
        except orjson.JSONDecodeError:
            raise Unauthorized("the token's payload is not JSON") from None
        if not isinstance(claims, dict):
            raise Unauthorized("the token's payload is not a JSON object")
        return claims

    def _check_claims(self, claims: dict[str, Any], trust: IssuerTrust) -> None:
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self.clock()), leeway=self.leeway,
            iss={"essential": True, "value": trust.issuer},
            aud={"essential": True, "value": trust.audience},
            sub={"essential": True}, exp={"essential": True}, iat={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise Unauthorized("the token has expired") from None
        except MissingClaimError as exc:
            raise Unauthorized(f"the token lacks a required claim: {exc.description}") from None
        except JoseError as exc:
            raise Unauthorized(f"the token's claims are not valid: {exc.description}") from None

    def _principal(self, claims: dict[str, Any], trust: IssuerTrust, cert_bound: bool) -> Principal:
        amr = claims.get("amr")
        amr_values = tuple(v for v in amr if isinstance(v, str)) if isinstance(amr, list) else ()
        auth_time = claims.get("auth_time")
        client_id = claims.get("client_id") if isinstance(claims.get("client_id"), str) else None
        person = auth_time is not None or bool(amr_values) or (client_id is not None and claims["sub"] != client_id)
        acr = claims.get("acr")
        jti = claims.get("jti")
        return Principal(
            subject=str(claims["sub"]),
            kind="person" if person else "service",
            roles=roles_from_claims(claims, trust.roles_claims),
            issuer=trust.issuer,
            client_id=client_id,
            amr=amr_values,
            acr=acr if isinstance(acr, str) else None,
            auth_time=int(auth_time) if isinstance(auth_time, (int, float)) and not isinstance(auth_time, bool) else None,
            token_id=jti if isinstance(jti, str) else None,
            cert_bound=cert_bound,
        )
