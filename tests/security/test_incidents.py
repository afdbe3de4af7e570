"""Incident controls: revoke a token, a principal or a client certificate, quarantine a model
version, lock down, and rotate the issuer's key, on two running gateways that share a real Redis;
effective on both within 2 s, audited, refused without MFA or the admin role, and still in force
after a restart (and after Redis lost everything)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.security.incidents import Controls, IncidentError, IncidentStore
from gateway.security.types import PeerIdentity, Principal
from tests.conftest import TEST_LIMITS, Gateway, fetch_token, free_port, start_gateway
from tests.security.test_limits import Redis

DIGITS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
WITHIN_S = 2.0


# -- the controls, as data --------------------------------------------------------------------------

def test_actions_are_checked_and_versioned() -> None:
    c = Controls()
    with pytest.raises(IncidentError, match="reason is required"):
        c.apply("revoke-token", {"jti": "a"}, "op", " ")
    with pytest.raises(IncidentError, match="unknown action"):
        c.apply("explode", {}, "op", "why")
    with pytest.raises(IncidentError, match='"jti" is required'):
        c.apply("revoke-token", {}, "op", "why")
    with pytest.raises(IncidentError, match="64 hex digits"):
        c.apply("revoke-certificate", {"sha256": "abc"}, "op", "why")
    with pytest.raises(IncidentError, match="not in force") as info:
        c.apply("release", {"model": "digits", "version": "1"}, "op", "why")
    assert info.value.status == 409
    c1 = c.apply("revoke-token", {"jti": "t1", "expires_at": 2000.0}, "op", "stolen", now=1000.0)
    c2 = c1.apply("revoke-token", {"jti": "t2", "expires_at": 9000.0}, "op", "stolen", now=3000.0)
    assert (c1.version, c2.version) == (1, 2) and set(c2.tokens) == {"t2"}  # expired revocations are dropped
    locked = c2.apply("lockdown", {"break_glass": ["alice"]}, "iss|op", "breach")
    assert locked.lockdown is not None and locked.lockdown["break_glass"] == ["alice", "iss|op"]
    demo = Principal("demo", "service", frozenset(), issuer="iss")
    assert locked.locked_out(demo) and locked.locked_out(None)
    assert not locked.locked_out(Principal("alice", "person", frozenset(), issuer="elsewhere"))
    assert Controls.from_dict(json.loads(json.dumps(locked.as_dict()))) == locked
    peer = PeerIdentity("CN=x", (), "AB" * 32, "tls")
    revoked = locked.apply("revoke-certificate", {"sha256": "ab" * 32}, "op", "lost laptop")
    assert revoked.refusal(None, peer) == "client certificate revoked"


@pytest.mark.parametrize("expires_at", ["tomorrow", [1], True, float("nan"), float("inf")],
                         ids=["text", "list", "bool", "nan", "infinite"])
def test_a_revocation_expiry_that_is_no_time_is_refused(expires_at: object) -> None:
    """A string or a list was a 500 (float() raised past the action's checks); true was taken as
    1.0, a revocation that expired in 1970 and was dropped at the next action."""
    with pytest.raises(IncidentError, match='"expires_at", when given, is the token\'s expiry'):
        Controls().apply("revoke-token", {"jti": "t1", "expires_at": expires_at}, "op", "stolen")


@pytest.mark.anyio
async def test_concurrent_actions_in_one_process_are_all_kept(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path / "incidents.json")
    await asyncio.wait_for(asyncio.gather(*(store.act("revoke-token", {"jti": f"t{i}", "expires_at": 9e9}, "op", "why")
                                            for i in range(20))), 10)
    again = IncidentStore(tmp_path / "incidents.json")  # another process reading the file
    assert again.controls.version == 20 and len(again.controls.tokens) == 20
    assert oct((tmp_path / "incidents.json").stat().st_mode & 0o777) == "0o600"


# -- two replicas -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    r = Redis(tmp_path_factory.mktemp("redis-incidents"))
    r.start()
    yield r
    r.kill()


class Replicas:
    def __init__(self, pki: Path, tmp: pytest.TempPathFactory, models_root: Path, redis: Redis) -> None:
        self.pki, self.models_root = pki, models_root
        self.issuer_url = f"https://localhost:{free_port()}"
        self.limits = TEST_LIMITS + f'storage = "redis://127.0.0.1:{redis.port}/0"\nstorage_timeout_s = 0.25\n'
        self.dirs = [tmp.mktemp(f"gw-incidents-{i}") for i in range(2)]
        self.gws = [self.start(i) for i in range(2)]

    def start(self, i: int) -> Gateway:
        return start_gateway(self.pki, self.dirs[i], self.models_root, limits=self.limits, issuer_url=self.issuer_url)

    def restart(self, i: int) -> None:
        self.gws[i].stop()
        self.gws[i] = self.start(i)

    def stop(self) -> None:
        for gw in self.gws:
            gw.stop()


@pytest.fixture(scope="module")
def replicas(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path, redis: Redis) -> Iterator[Replicas]:
    r = Replicas(pki, tmp_path_factory, models_root, redis)
    yield r
    r.stop()


def call(gw: Gateway, token: str | None, principal: str = "demo", method: str = "POST",
         path: str = "/v2/models/digits/infer", body: Any = DIGITS) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with gw.client(principal, token=False, headers=headers) as c:
        return c.request(method, path, json=body if method == "POST" else None)


def act(gw: Gateway, operator: str, **body: Any) -> httpx.Response:
    return call(gw, operator, "admin", "POST", "/admin/incidents/actions", body)


def within(check: Callable[[], bool], seconds: float = WITHIN_S) -> float:
    """How long ``check`` took to hold (polled), failing past ``seconds``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"not in force within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def jti(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def demo_cert_sha256(pki: Path) -> str:
    cert = x509.load_pem_x509_certificate((pki / "certs" / "client-demo.pem").read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def test_each_control_applies_on_both_replicas_within_two_seconds(replicas: Replicas) -> None:
    a, b = replicas.gws
    operator = b.token("admin")  # one sign-in per replica and TOTP step: the token is kept
    stolen = fetch_token(a.url, a.pki, "demo")
    assert call(b, stolen).status_code == 200

    # A token, by its jti: refused on both; a fresh token for the same client is fine.
    assert act(a, operator, action="revoke-token", jti=jti(stolen), reason="INC-1: token leaked in a log").status_code == 200
    within(lambda: call(b, stolen).status_code == 401)
    refused = call(a, stolen)
    assert refused.json()["type"].endswith("credential-revoked") and "access token revoked" in refused.json()["detail"]
    assert call(b, fetch_token(a.url, a.pki, "demo")).status_code == 200

    # A principal: every token of it refused, and the built-in issuer issues it none.
    principal = f"{replicas.issuer_url}|demo"
    fresh = fetch_token(a.url, a.pki, "demo")
    assert act(b, operator, action="revoke-principal", principal=principal, reason="INC-2: client secret stolen").status_code == 200
    within(lambda: call(a, fresh).status_code == 401)
    with pytest.raises(AssertionError, match="this principal is revoked"):
        fetch_token(a.url, a.pki, "demo")
    assert act(a, operator, action="reinstate-principal", principal=principal, reason="INC-2: secret rotated").status_code == 200
    within(lambda: call(b, fresh).status_code == 200)

    # A client certificate, by its SHA-256: refused even with a good token, and at the issuer.
    sha = demo_cert_sha256(a.pki)
    assert act(a, operator, action="revoke-certificate", sha256=sha, reason="INC-3: laptop lost").status_code == 200
    within(lambda: call(b, fresh).status_code == 401)
    assert "client certificate revoked" in call(b, fresh).json()["detail"]
    with pytest.raises(AssertionError, match="client certificate is revoked"):
        fetch_token(b.url, b.pki, "demo")
    assert act(b, operator, action="reinstate-certificate", sha256=sha, reason="INC-3: laptop found").status_code == 200
    within(lambda: call(a, fresh).status_code == 200)
    serial = format(x509.load_pem_x509_certificate((a.pki / "certs" / "client-demo.pem").read_bytes()).serial_number, "X")
    assert act(a, operator, action="revoke-certificate", serial=serial, reason="INC-3b: by its serial").status_code == 200
    within(lambda: call(b, fresh).status_code == 401)
    assert act(b, operator, action="reinstate-certificate", serial=serial, reason="INC-3b: done").status_code == 200
    within(lambda: call(a, fresh).status_code == 200)

    # A model version: 503 of a documented type on both, not ready, until released.
    assert act(a, operator, action="quarantine", model="digits", version="1", reason="INC-4: poisoned?").status_code == 200
    within(lambda: call(b, fresh).status_code == 503)
    held = call(a, fresh)
    assert held.json()["type"].endswith("model-quarantined") and held.headers["retry-after"] == "60"
    assert call(b, fresh, method="GET", path="/v2/models/digits/ready").status_code == 503
    assert call(b, fresh, method="GET", path="/v2/models/resnetish/ready").status_code == 200  # only that one
    assert act(b, operator, action="release", model="digits", version="1", reason="INC-4: checked").status_code == 200
    within(lambda: call(a, fresh).status_code == 200)

    # Lockdown: 503 with Retry-After for everyone but the break-glass principals (and its operator).
    assert act(a, operator, action="lockdown", break_glass=[], reason="INC-5: breach in progress").status_code == 200
    within(lambda: call(b, fresh).status_code == 503)
    locked = call(a, fresh)
    assert locked.json()["type"].endswith("lockdown") and locked.headers["retry-after"] == "60"
    assert call(b, operator, "admin").status_code == 200  # the operator is still served
    assert call(b, None, method="GET", path="/v2/health/ready").status_code == 200  # probes are not locked out
    assert act(b, operator, action="lift", reason="INC-5: contained").status_code == 200
    within(lambda: call(a, fresh).status_code == 200)

    # Every action has its record, with who and why.
    records = [r for gw in (a, b) for r in gw.audit_records() if r.get("path") == "/admin/incidents/actions"]
    assert sorted(r["action"]["reason"] for r in records) == sorted([
        "INC-1: token leaked in a log", "INC-2: client secret stolen", "INC-2: secret rotated", "INC-3: laptop lost",
        "INC-3: laptop found", "INC-3b: by its serial", "INC-3b: done", "INC-4: poisoned?", "INC-4: checked", "INC-5: breach in progress", "INC-5: contained"])
    assert all(r["principal"]["subject"] == "admin" and r["status"] == 200 for r in records)


def test_revocations_survive_a_restart_and_the_loss_of_redis(replicas: Replicas, redis: Redis) -> None:
    a, b = replicas.gws
    operator = b.token("admin")
    stolen = fetch_token(a.url, a.pki, "demo")
    assert act(b, operator, action="revoke-token", jti=jti(stolen), reason="INC-6: leaked").status_code == 200
    redis.kill()
    redis.start()  # an empty Redis
    replicas.restart(0)
    a = replicas.gws[0]
    assert call(a, stolen).status_code == 401  # from its own file
    assert call(b, stolen).status_code == 401
    status = call(a, operator, "admin", "GET", "/admin/incidents", None).json()
    assert jti(stolen) in status["controls"]["tokens"]
    time.sleep(1.0)  # a poll puts the newest snapshot back into the empty Redis
    assert subprocess.run(["redis-cli", "-p", str(redis.port), "exists", "gateway:incidents"],
                          capture_output=True, text=True).stdout.strip() == "1"


def test_the_admin_api_wants_the_admin_role_and_a_second_factor(replicas: Replicas, tmp_path: Path) -> None:
    a, b = replicas.gws
    weak = fetch_token(a.url, a.pki, "admin", mfa=False)
    body = {"action": "lockdown", "reason": "x"}
    assert call(a, weak, "admin", "POST", "/admin/incidents/actions", body).status_code == 401
    assert call(a, fetch_token(a.url, a.pki, "demo"), "demo", "POST", "/admin/incidents/actions", body).status_code == 403
    operator = b.token("admin")
    bad = call(a, operator, "admin", "POST", "/admin/incidents/actions", {"action": "lockdown"})
    assert bad.status_code == 400 and "reason" in bad.json()["detail"]
    assert call(a, operator, "admin", "POST", "/admin/incidents/actions",
                {"action": "lift", "reason": "nothing"}).status_code == 409
    refusals = [r["status"] for r in a.audit_records() if r.get("path") == "/admin/incidents/actions" and r["status"] >= 400]
    assert refusals[-4:] == [401, 403, 400, 409]
    no_time = call(a, operator, "admin", "POST", "/admin/incidents/actions",
                   {"action": "revoke-token", "jti": "j1", "expires_at": "tomorrow", "reason": "INC-6"})
    assert no_time.status_code == 400 and "expires_at" in no_time.json()["detail"]
    # The CLI, with the operator's token; rotate-key makes a new signing key on the running gateway.
    stolen_before_rotation = fetch_token(a.url, a.pki, "demo")
    creds = json.loads((a.pki / "credentials.json").read_text())
    creds["gateway"], creds["token_endpoint"] = a.url, f"{a.url}/oauth/token"
    (tmp_path / "credentials.json").write_text(json.dumps(creds))
    env = {"GATEWAY_TOKEN": operator, "PATH": "/usr/bin:/bin"}
    base = [sys.executable, "-m", "gateway", "admin"]
    opts = ["--credentials", str(tmp_path / "credentials.json")]
    missing = subprocess.run([*base, "quarantine", "digits", "1", *opts], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "--reason" in missing.stderr
    done = subprocess.run([*base, "quarantine", "digits", "1", "--reason", "INC-7", *opts], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0 and "in force on every replica" in done.stdout, done.stderr
    status = subprocess.run([*base, "status", *opts], capture_output=True, text=True, env=env)
    assert "digits/1" in json.loads(status.stdout)["controls"]["quarantined"]
    subprocess.run([*base, "release", "digits", "1", "--reason", "INC-7 done", *opts], check=True, env=env,
                   capture_output=True)
    rotated = subprocess.run([*base, "rotate-key", "--reason", "INC-8: key may have leaked", *opts], capture_output=True,
                             text=True, env=env)
    assert rotated.returncode == 0 and "new signing key" in rotated.stdout, rotated.stderr
    kid = rotated.stdout.split()[3].rstrip(";")

    def signed_with_new_key() -> bool:
        header = fetch_token(a.url, a.pki, "demo").split(".")[0]
        return bool(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"] == kid)

    within(signed_with_new_key)
    assert call(a, stolen_before_rotation).status_code == 200  # the old key's tokens verify until they expire
