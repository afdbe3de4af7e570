"""The negative token matrix of THREATS.md against a running gateway.

Every token here is minted with the built-in issuer's real signing key (or deliberately not), so
each case differs from an accepted token in exactly the way its name says.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from joserfc import jwt
from joserfc.jwk import ECKey, Key, OctKey

from gateway.security.issuer import IssuerStore
from gateway.security.tls import identity_from_der
from gateway.security.tokens import cert_thumbprint
from tests.conftest import Gateway, client_context

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}


def _signing_key(gw: Gateway) -> Key:
    return IssuerStore(gw.pki / "issuer").current_key().keys[0]


def _claims(gw: Gateway, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": gw.url, "aud": gw.url, "sub": "demo", "client_id": "demo", "iat": now, "exp": now + 300,
              "jti": f"t{time.monotonic_ns()}", "roles": ["inference"]}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def mint(gw: Gateway, header: dict[str, Any] | None = None, key: Key | None = None, **claims: Any) -> str:
    key = key or _signing_key(gw)
    head = {"alg": "ES256", "typ": "at+jwt", "kid": key.kid, **(header or {})}
    return jwt.encode({k: v for k, v in head.items() if v is not None}, _claims(gw, **claims), key,
                      algorithms=[head["alg"]])


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _cert_thumbprint(gw: Gateway, principal: str) -> str:
    pem = (gw.pki / "certs" / f"client-{principal}.pem").read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    return cert_thumbprint(identity_from_der(der))


def _alg_none(gw: Gateway) -> str:
    return f"{_b64({'alg': 'none', 'typ': 'at+jwt'})}.{_b64(_claims(gw))}."


def _hs256_with_public_key(gw: Gateway) -> str:
    public = json.dumps(IssuerStore(gw.pki / "issuer").jwks()["keys"][-1]).encode()
    return jwt.encode({"alg": "HS256", "typ": "at+jwt", "kid": _signing_key(gw).kid}, _claims(gw),
                      OctKey.import_key(public), algorithms=["HS256"])


def _unknown_kid(gw: Gateway) -> str:
    stranger = ECKey.generate_key("P-256", {"alg": "ES256", "kid": "not-a-key-of-ours"}, private=True)
    return mint(gw, key=stranger)


def _unsigned_with(gw: Gateway, **header: Any) -> str:
    """A token whose header says what a test needs (not signed: refused before any key is used)."""
    return f"{_b64({'alg': 'ES256', 'typ': 'at+jwt', **header})}.{_b64(_claims(gw))}.c2ln"


def _tampered(gw: Gateway) -> str:
    head, _, sig = mint(gw).split(".")
    return f"{head}.{_b64(_claims(gw, roles=['admin']))}.{sig}"


CASES: list[tuple[str, Callable[[Gateway], str | None], str | None]] = [
    ("no token", lambda gw: None, None),
    ("garbage", lambda gw: "not-a-token", "invalid_token"),
    ("three garbage parts", lambda gw: "a.b.c", "invalid_token"),
    ("alg none", _alg_none, "invalid_token"),
    ("HS256 keyed with the public key", _hs256_with_public_key, "invalid_token"),
    ("unknown kid", _unknown_kid, "invalid_token"),
    ("jku header", lambda gw: mint(gw, {"jku": "https://attacker.example/jwks"}), "invalid_token"),
    ("x5u header", lambda gw: mint(gw, {"x5u": "https://attacker.example/cert.pem"}), "invalid_token"),
    ("embedded jwk header", lambda gw: mint(gw, {"jwk": {"kty": "EC"}}), "invalid_token"),
    ("expired beyond the leeway", lambda gw: mint(gw, exp=int(time.time()) - 120, iat=int(time.time()) - 600), "invalid_token"),
    ("nbf in the future", lambda gw: mint(gw, nbf=int(time.time()) + 600), "invalid_token"),
    ("iat in the future", lambda gw: mint(gw, iat=int(time.time()) + 600), "invalid_token"),
    ("no exp", lambda gw: mint(gw, exp=None), "invalid_token"),
    ("wrong iss", lambda gw: mint(gw, iss="https://evil.example"), "invalid_token"),
    ("wrong aud", lambda gw: mint(gw, aud="https://some-other-api.example"), "invalid_token"),
    ("typ JWT instead of at+jwt", lambda gw: mint(gw, {"typ": "JWT"}), "invalid_token"),
    ("no typ", lambda gw: mint(gw, {"typ": None}), "invalid_token"),
    ("payload edited after signing", _tampered, "invalid_token"),
    ("bound to another client certificate", lambda gw: mint(gw, cnf={"x5t#S256": _cert_thumbprint(gw, "admin")}),
     "invalid_token"),
    # Client-chosen text that ends up in the WWW-Authenticate header cannot break it.
    ("kid beyond Latin-1", lambda gw: mint(gw, {"kid": "k\u20ac\u4e2d"}), "invalid_token"),
    ("alg beyond Latin-1", lambda gw: _unsigned_with(gw, alg="ES256\u20ac"), "invalid_token"),
    ("typ beyond Latin-1", lambda gw: _unsigned_with(gw, typ="at+jwt\u20ac"), "invalid_token"),
    ("kid with CR LF", lambda gw: mint(gw, {"kid": "k\r\nSet-Cookie: x=1"}), "invalid_token"),
]


@pytest.mark.parametrize("make,error", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_refused_tokens_get_401_with_a_bearer_challenge(
        gateway: Gateway, make: Callable[[Gateway], str | None], error: str | None) -> None:
    token = make(gateway)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with gateway.client(token=False, headers=headers) as c:
        r = c.post(INFER, json=BODY)
    assert r.status_code == 401, r.text
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="gateway"')
    if error is None:
        assert "error=" not in challenge  # RFC 6750 3.1: no error code when no credentials were sent
    else:
        assert f'error="{error}"' in challenge
    body = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert body["status"] == 401 and body["error"] == body["detail"]
    assert token is None or token not in r.text  # the token is never echoed back


def test_a_refusal_over_a_strange_header_is_recorded_with_its_reason(gateway: Gateway) -> None:
    with gateway.client(token=False, headers={"Authorization": f"Bearer {mint(gateway, {'kid': 'k€'})}"}) as c:
        r = c.post(INFER, json=BODY)
    assert r.status_code == 401 and r.headers["www-authenticate"].isascii()
    record = gateway.record_of(r.headers["x-request-id"])
    assert record["status"] == 401 and record["reason"]["type"] == "unauthorized"


def test_the_control_token_is_accepted(gateway: Gateway) -> None:
    """The minting above is right: the same recipe without a defect is served."""
    bound = mint(gateway, cnf={"x5t#S256": _cert_thumbprint(gateway, "demo")})
    for token in (mint(gateway), bound):
        with gateway.client(token=False, headers={"Authorization": f"Bearer {token}"}) as c:
            r = c.post(INFER, json=BODY)
        assert r.status_code == 200, r.text


def test_a_token_within_the_leeway_is_accepted(gateway: Gateway) -> None:
    token = mint(gateway, exp=int(time.time()) - 5)
    with gateway.client(token=False, headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.post(INFER, json=BODY).status_code == 200


@pytest.mark.parametrize("value", ["Basic ZGVtbzpzZWNyZXQ=", "Bearer", "Token abc"])
def test_other_authorization_schemes_are_invalid_requests(gateway: Gateway, value: str) -> None:
    with gateway.client(token=False, headers={"Authorization": value}) as c:
        r = c.post(INFER, json=BODY)
    assert r.status_code == 401 and 'error="invalid_request"' in r.headers["www-authenticate"]


def test_health_needs_no_token_but_everything_else_does(gateway: Gateway) -> None:
    with gateway.client(token=False) as c:
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2/health/live").status_code == 200
        for path in ("/v2", "/v2/models", "/v2/models/digits", "/v2/models/digits/ready", "/admin/models"):
            r = c.get(path)
            assert r.status_code == 401, path
        assert c.post("/v2/repository/index").status_code == 401
        # A missing model is not revealed to an anonymous caller either.
        assert c.get("/v2/models/no-such-model").status_code == 401


def test_an_oversized_token_is_refused_without_parsing(gateway: Gateway) -> None:
    with gateway.client(token=False, headers={"Authorization": "Bearer " + "a" * 9000}) as c:
        r = c.post(INFER, json=BODY)
    assert r.status_code == 401 and "longer than" in r.json()["detail"]


def test_only_the_built_in_key_set_is_published(gateway: Gateway) -> None:
    with httpx.Client(verify=client_context(gateway.pki)) as c:
        jwks = c.get(f"{gateway.url}/oauth/jwks").json()
        meta = c.get(f"{gateway.url}/.well-known/openid-configuration").json()
    assert jwks["keys"] and all("d" not in k for k in jwks["keys"])  # public halves only
    assert meta["issuer"] == gateway.url and meta["jwks_uri"] == gateway.url + "/oauth/jwks"
    assert meta["tls_client_certificate_bound_access_tokens"] is True
