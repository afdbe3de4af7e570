"""The verified-token memory: a remembered token is held to the same time checks and binding as a
fresh one, at every instant around its edges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from joserfc import jwt

from gateway.config import load_config
from gateway.errors import Unauthorized
from gateway.security.issuer import IssuerStore
from gateway.security.tls import identity_from_der
from gateway.security.tokens import TokenValidator, cert_thumbprint
from gateway.security.types import PeerIdentity

pytestmark = pytest.mark.anyio
T0 = 1_900_000_000


def _peer(pki: Path, name: str) -> PeerIdentity:
    pem = (pki / "certs" / f"client-{name}.pem").read_bytes()
    return identity_from_der(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER))


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


def _validator(pki: Path, clock: Clock) -> TokenValidator:
    store = IssuerStore(pki / "issuer")
    return TokenValidator(load_config(pki / "gateway.toml", environ={}), lambda: store.public_keys(), clock)


def _mint(pki: Path, **claims: Any) -> str:
    config = load_config(pki / "gateway.toml", environ={})
    key = IssuerStore(pki / "issuer").current_key().keys[0]
    body = {"iss": config.issuer_url, "aud": config.audience, "sub": "demo", "client_id": "demo", "iat": T0,
            "exp": T0 + 300, "jti": "j1", "roles": ["inference"], **claims}
    return jwt.encode({"alg": "ES256", "typ": "at+jwt", "kid": key.kid}, {k: v for k, v in body.items() if v is not None},
                      key, algorithms=["ES256"])


async def _outcome(validator: TokenValidator, token: str, peer: PeerIdentity | None) -> str:
    try:
        principal = await validator.authenticate(token, peer)
    except Unauthorized as exc:
        return f"refused: {exc.detail}"
    return f"accepted: {principal.subject} {sorted(principal.roles)}"


@pytest.mark.parametrize("claims", [{}, {"nbf": T0 + 100}, {"iat": T0 + 100}], ids=["plain", "nbf", "iat"])
async def test_a_remembered_token_is_judged_as_a_fresh_one_at_every_instant(pki: Path, claims: dict[str, Any]) -> None:
    token = _mint(pki, **claims)
    leeway = load_config(pki / "gateway.toml", environ={}).auth.leeway_s
    edges = [T0 + 100 - leeway - 1, T0 + 100 - leeway, T0 + 100 - leeway + 1, T0 + 150,
             T0 + 300 + leeway - 1, T0 + 300 + leeway, T0 + 300 + leeway + 1]
    clock = Clock()
    remembering = _validator(pki, clock)
    clock.now = T0 + 150
    first = await _outcome(remembering, token, None)
    assert first.startswith("accepted"), first
    outcomes = []
    for t in edges:
        clock.now = t
        fresh_clock = Clock()
        fresh_clock.now = t
        fresh = await _outcome(_validator(pki, fresh_clock), token, None)
        assert await _outcome(remembering, token, None) == fresh, f"at T0+{t - T0}"
        outcomes.append(fresh.split(":")[0])
    assert "accepted" in outcomes and "refused" in outcomes  # the edges were crossed


async def test_a_remembered_bound_token_still_needs_its_certificate(pki: Path) -> None:
    demo, admin = _peer(pki, "demo"), _peer(pki, "admin")
    token = _mint(pki, cnf={"x5t#S256": cert_thumbprint(demo)})
    clock = Clock()
    validator = _validator(pki, clock)
    assert (await _outcome(validator, token, demo)).startswith("accepted")
    assert await _outcome(validator, token, admin) == "refused: the token is bound to another client certificate"
    assert await _outcome(validator, token, None) == "refused: the token is bound to another client certificate"
    assert (await _outcome(validator, token, demo)).startswith("accepted")
