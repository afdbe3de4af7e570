"""A real OpenID provider (the npm package ``oidc-provider``) as an external issuer.

The provider issues RFC 9068 JWT access tokens by client credentials; the gateway finds its keys
by OIDC discovery. Covered: roles from its tokens, its key rotation, and its outage (cached keys
serve until ``jwks_ttl_s``, then 503, and never an unverified token).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import ECKey

from tests.conftest import ROOT, Gateway, free_port, start_gateway
from tests.test_metrics import value

pytestmark = pytest.mark.slow

OIDC_DIR = ROOT / "tests" / "oidc"
DIGITS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
TTL_S = 6


def _key() -> dict[str, object]:
    key = ECKey.generate_key("P-256", {"alg": "ES256", "use": "sig"}, private=True)
    key.ensure_kid()
    return dict(key.as_dict(private=True))


class Provider:
    def __init__(self, directory: Path, audience: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.directory = directory
        self.audience = audience
        self.proc: subprocess.Popen[bytes] | None = None
        self.keys: list[dict[str, object]] = [_key()]

    def rotate(self) -> dict[str, object]:
        """Restart with a new signing key in front; the previous keys stay published."""
        self.stop()
        key = _key()
        self.keys.insert(0, key)
        self.start()
        return key

    def start(self) -> None:
        keys_file = self.directory / "keys.json"
        keys_file.write_text(json.dumps({"keys": self.keys}))
        with open(self.directory / "provider.log", "ab") as log:
            self.proc = subprocess.Popen(["node", "server.mjs", str(self.port), str(keys_file), self.audience],
                                         cwd=OIDC_DIR, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/.well-known/openid-configuration", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError((self.directory / "provider.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def token(self, client: str) -> str:
        r = httpx.post(self.url + "/token", data={"grant_type": "client_credentials", "scope": "models"},
                       auth=(client, f"{client}-secret-0123456789abcdef"), timeout=5)
        r.raise_for_status()
        return str(r.json()["access_token"])


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    if shutil.which("node") is None or not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("node and tests/oidc/node_modules are needed: `make test` installs them (npm ci in tests/oidc)")
    directory = tmp_path_factory.mktemp("oidc")
    p = Provider(directory, audience="https://gateway.test/")
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def oidc_gateway(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path,
                 provider: Provider) -> Iterator[Gateway]:
    sections = f"""
[[auth.issuers]]
issuer = "{provider.url}"
audience = "https://gateway.test/"
roles_claims = ["roles"]
jwks_ttl_s = {TTL_S}
jwks_refresh_s = 1

[[rbac.rules]]
name = "readers"
roles = ["reader"]
verbs = ["infer", "metadata", "list"]
models = ["digits"]

[[rbac.rules]]
name = "ops"
roles = ["ops"]
verbs = ["metadata", "list"]
models = ["*"]

[[rbac.rules]]
name = "monitoring"
roles = ["admin"]
verbs = ["metrics"]
"""
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw-oidc"), models_root, sections=sections)
    yield gw
    gw.stop()


def _call(gw: Gateway, token: str, method: str = "POST", path: str = "/v2/models/digits/infer") -> httpx.Response:
    with gw.client(token=False, headers={"Authorization": f"Bearer {token}"}) as c:
        return c.request(method, path, json=DIGITS if method == "POST" else None)


def test_provider_tokens_carry_their_roles(oidc_gateway: Gateway, provider: Provider) -> None:
    reader, ops = provider.token("svc-reader"), provider.token("svc-ops")
    assert _call(oidc_gateway, reader).status_code == 200
    assert _call(oidc_gateway, reader, "GET", "/v2/models/resnetish").status_code == 404
    assert _call(oidc_gateway, ops, "GET", "/v2/models/resnetish").status_code == 200
    assert _call(oidc_gateway, ops).status_code == 403  # sees digits, may not infer on it
    listed = _call(oidc_gateway, reader, "GET", "/v2/models").json()["models"]
    assert [m["name"] for m in listed] == ["digits"]


def test_provider_key_rotation(oidc_gateway: Gateway, provider: Provider) -> None:
    old_token = provider.token("svc-reader")
    assert _call(oidc_gateway, old_token).status_code == 200
    new_key = provider.rotate()
    new_token = provider.token("svc-reader")
    assert json.loads(base64.urlsafe_b64decode(new_token.split(".")[0] + "==="))["kid"] == new_key["kid"]
    time.sleep(1.1)  # an unknown kid refetches at most once per jwks_refresh_s
    assert _call(oidc_gateway, new_token).status_code == 200
    assert _call(oidc_gateway, old_token).status_code == 200  # still published: still valid


def test_provider_outage_serves_cached_keys_then_503_never_unverified(
        oidc_gateway: Gateway, provider: Provider) -> None:
    token = provider.token("svc-reader")
    # A key the gateway has not seen forces a fresh fetch, so the TTL below starts now.
    provider.rotate()
    fresh = provider.token("svc-reader")
    time.sleep(1.1)
    assert _call(oidc_gateway, fresh).status_code == 200
    provider.stop()
    stopped = time.monotonic()
    assert _call(oidc_gateway, token).status_code == 200  # cached keys keep serving
    statuses = []
    while time.monotonic() - stopped < TTL_S + 8:
        r = _call(oidc_gateway, token)
        statuses.append(r.status_code)
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "cannot be fetched" in r.json()["detail"]
            break
        time.sleep(0.5)
    assert statuses[-1] == 503, statuses
    assert set(statuses) <= {200, 503}  # never a 500, never a 401 for a good token
    assert time.monotonic() - stopped >= TTL_S - 1  # not before the TTL ran out
    assert _call(oidc_gateway, token).status_code == 503
    with oidc_gateway.client("admin") as admin:  # what an alert on the provider sees
        scrape = admin.get("/metrics").text
    assert value(scrape, "gateway_jwks_fetch_errors_total", issuer=provider.url) >= 1
    assert value(scrape, "gateway_jwks_fresh", issuer=provider.url) == 0
    # The built-in issuer's tokens do not depend on the external provider.
    # (verified, then refused by this gateway's policy, which grants "inference" nothing: 404)
    assert _call(oidc_gateway, oidc_gateway.token("demo")).status_code == 404
    provider.start()
    time.sleep(1.1)
    assert _call(oidc_gateway, token).status_code == 200  # recovered by itself
