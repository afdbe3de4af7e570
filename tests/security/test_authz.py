"""Authorization through a running gateway: tenants, step-up, and function-level access."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from gateway.security.issuer import IssuerStore
from tests.conftest import Gateway, client_context, fetch_token, start_gateway

pytestmark = pytest.mark.slow

DIGITS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}


def _tenant_token(gw: Gateway, tenant: str) -> str:
    """A service client holding only the role ``tenant``, registered through the issuer's store."""
    key = f"tenant:{tenant}"
    if key not in gw.tokens:
        secret = IssuerStore(gw.pki / "issuer").add_client(f"svc-{tenant}", [tenant])
        with httpx.Client(base_url=gw.url, verify=client_context(gw.pki)) as c:
            # The gateway re-reads the client table within a second of a change.
            for _ in range(30):
                r = c.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=(f"svc-{tenant}", secret))
                if r.status_code == 200:
                    break
                time.sleep(0.1)
        assert r.status_code == 200, r.text
        gw.tokens[key] = r.json()["access_token"]
    return gw.tokens[key]


def _as(gw: Gateway, token: str) -> httpx.Client:
    return gw.client(token=False, headers={"Authorization": f"Bearer {token}"})


def test_each_tenant_sees_and_calls_only_its_own_model(gateway: Gateway) -> None:
    a, b = _tenant_token(gateway, "tenant-a"), _tenant_token(gateway, "tenant-b")
    with _as(gateway, a) as ca, _as(gateway, b) as cb:
        assert [m["name"] for m in ca.get("/v2/models").json()["models"]] == ["digits"]
        assert [m["name"] for m in cb.get("/v2/models").json()["models"]] == ["resnetish"]
        assert [m["name"] for m in ca.post("/v2/repository/index").json()] == ["digits"]
        assert ca.post("/v2/models/digits/infer", json=DIGITS).status_code == 200
        hidden = ca.get("/v2/models/resnetish")
        missing = ca.get("/v2/models/no-such-model")
        assert hidden.status_code == missing.status_code == 404
        # Word for word the same answer as for a model that does not exist.
        assert hidden.json()["detail"].replace("resnetish", "X") == missing.json()["detail"].replace("no-such-model", "X")
        assert set(hidden.headers) - {"x-request-id", "content-length"} == set(missing.headers) - {"x-request-id", "content-length"}
        assert ca.post("/v2/models/resnetish/infer", content=b"{}").status_code == 404
        assert ca.get("/v2/models/resnetish/versions/1/ready").status_code == 404
        assert cb.post("/v2/models/digits/infer", json=DIGITS).status_code == 404


def test_a_visible_model_without_the_verb_is_403(gateway: Gateway, tmp_path: Path) -> None:
    # "inference" may not do admin verbs; the model list it can see is no secret, so 403, not 404.
    with gateway.client() as c:
        r = c.get("/admin/models")
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]


def test_step_up_password_only_gets_the_rfc_9470_challenge_and_totp_passes(gateway: Gateway) -> None:
    weak = fetch_token(gateway.url, gateway.pki, "admin", mfa=False)
    with gateway.client("admin", token=False, headers={"Authorization": f"Bearer {weak}"}) as c:
        r = c.get("/admin/models")
        assert c.post("/v2/models/digits/infer", json=DIGITS).status_code == 200  # not an admin verb
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge
    assert 'acr_values="urn:gateway:acr:mfa"' in challenge
    assert r.json()["acr_values"] == "urn:gateway:acr:mfa"
    with gateway.client("admin") as c:  # the fixture's admin token carries amr pwd+otp+mfa
        strong = c.get("/admin/models")
    assert strong.status_code == 200
    assert {m["name"] for m in strong.json()["models"]} == {"digits", "resnetish"}


def test_a_service_token_on_a_person_only_route_is_403(gateway: Gateway) -> None:
    """client_credentials cannot step up: a challenge would be pointless, so the answer is 403."""
    admin_service = _tenant_token(gateway, "admin")  # a service that holds the admin role
    with _as(gateway, admin_service) as c:
        r = c.get("/admin/models")
    assert r.status_code == 403 and "cannot step up" in r.json()["detail"]


def test_token_endpoint_refusals_are_problem_details(gateway: Gateway) -> None:
    creds = json.loads((gateway.pki / "credentials.json").read_text())["principals"]["demo"]
    with httpx.Client(base_url=gateway.url, verify=client_context(gateway.pki)) as c:
        wrong = c.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=("demo", "wrong"))
        grant = c.post("/oauth/token", data={"grant_type": "authorization_code"},
                       auth=(creds["client_id"], creds["client_secret"]))
        form = c.post("/oauth/token", json={"grant_type": "client_credentials"})
        repeated = c.post("/oauth/token", content=b"grant_type=password&grant_type=client_credentials",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    assert grant.status_code == 400 and grant.json()["error"] == "unsupported_grant_type"
    assert form.status_code == 415 and repeated.status_code == 400
    for r in (wrong, grant, form, repeated):
        assert r.headers["content-type"] == "application/problem+json"
        assert {"type", "title", "status", "detail"} <= set(r.json())
        assert creds["client_secret"] not in r.text


def test_tokens_the_issuer_hands_out(gateway: Gateway) -> None:
    import base64

    def claims(token: str) -> dict[str, object]:
        part = token.split(".")[1]
        return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))

    service, person = claims(gateway.token("demo")), claims(gateway.token("admin"))
    assert service["sub"] == service["client_id"] == "demo" and service["roles"] == ["inference"]
    assert "amr" not in service and "auth_time" not in service
    assert person["sub"] == "admin" and person["amr"] == ["pwd", "otp", "mfa"]
    assert person["acr"] == "urn:gateway:acr:mfa" and isinstance(person["auth_time"], int)
    for c in (service, person):
        assert c["exp"] - c["iat"] == 900 and c["jti"] and c["aud"] == gateway.url  # type: ignore[operator]
        assert "x5t#S256" in c["cnf"]  # type: ignore[operator]  # requested over mTLS: bound to the certificate


def test_tritonclient_with_a_bearer_token_over_mtls(gateway: Gateway) -> None:
    client = httpclient.InferenceServerClient(url=f"localhost:{gateway.port}", ssl=True,
                                              ssl_context_factory=lambda: client_context(gateway.pki))
    x = np.ones((2, 64), np.float32)
    inp = httpclient.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp], headers=gateway.auth("demo"))
    assert result.as_numpy("probabilities").shape == (2, 10)
    with pytest.raises(InferenceServerException) as hidden:
        client.get_model_metadata("resnetish", headers={"Authorization": f"Bearer {_tenant_token(gateway, 'tenant-a')}"})
    assert "404" in str(hidden.value.status())
    client.close()


def test_certificate_roles_without_a_token_when_configured(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> None:
    """auth.require_token = false: a mapped client certificate acts alone; an unmapped one does not."""
    sections = """
[auth.certificate_roles]
"URI:spiffe://gateway.local/principal/demo" = ["tenant-a"]
"""
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw-cert-roles"), models_root, auth="require_token = false",
                       sections=sections)
    try:
        with gw.client("demo", token=False) as c:
            assert c.post("/v2/models/digits/infer", json=DIGITS).status_code == 200
            assert c.get("/v2/models/resnetish").status_code == 404  # tenant-a sees digits only
            assert [m["name"] for m in c.get("/v2/models").json()["models"]] == ["digits"]
            assert c.get("/admin/models").status_code == 403
        with gw.client("admin", token=False) as c:
            assert c.get("/v2/models").status_code == 401
        with gw.client("demo") as c:  # with a token the certificate's roles are added to the token's
            names = [m["name"] for m in c.get("/v2/models").json()["models"]]
            assert names == ["digits", "resnetish"]
    finally:
        gw.stop()
