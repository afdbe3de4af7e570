"""The extraction monitor across two running gateways that share a real Redis: an alarm raised
through one applies on both, the admin API and ``gateway principals`` list and clear it (with
step-up and the reason audited), and a Redis outage degrades to local watching without a 500."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import TEST_LIMITS, Gateway, fetch_token, free_port, start_gateway
from tests.security.test_limits import Redis

pytestmark = pytest.mark.slow

WATCHED = """
[models.digits.extraction]
enabled = true
action = "label_only"
"""


def infer(gw: Gateway, token: str, row: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}]}
    with gw.client(token=False, headers={"Authorization": f"Bearer {token}"}) as c:
        r = c.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"][0]["data"])


def explain(gw: Gateway, token: str, row: np.ndarray) -> Any:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}]}
    with gw.client(token=False, headers={"Authorization": f"Bearer {token}"}) as c:
        return c.post("/v2/models/digits/explain", json=body)


def one_hot(p: np.ndarray) -> bool:
    return sorted(np.unique(p).tolist()) == [0.0, 1.0]


def operator_credentials(gw: Gateway, tmp: Path) -> Path:
    """``credentials.json`` as ``gateway init`` writes it, pointed at this gateway."""
    doc = json.loads((gw.pki / "credentials.json").read_text())
    doc["gateway"], doc["token_endpoint"] = gw.url, f"{gw.url}/oauth/token"
    path = tmp / "credentials.json"
    path.write_text(json.dumps(doc))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def replicas(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[tuple[Redis, list[Gateway]]]:
    redis = Redis(tmp_path_factory.mktemp("redis-extraction"))
    redis.start()
    issuer_url = f"https://localhost:{free_port()}"  # one public name for both, as behind a load balancer
    limits = TEST_LIMITS + f'storage = "redis://127.0.0.1:{redis.port}/0"\nstorage_timeout_s = 0.25\nstorage_retry_s = 1.0\n'
    gws = [start_gateway(pki, tmp_path_factory.mktemp(f"gw-extraction-{i}"), models_root, limits=limits,
                         issuer_url=issuer_url, sections=WATCHED) for i in range(2)]
    yield redis, gws
    for gw in gws:
        gw.stop()
    redis.kill()


def test_an_alarm_on_one_replica_holds_on_both_until_an_operator_clears_it(
        replicas: tuple[Redis, list[Gateway]], tmp_path: Path) -> None:
    _, (a, b) = replicas
    token = a.token("demo")
    digit = np.load(Path(__file__).resolve().parents[2] / "models" / "_data" / "digits-calibration.npy")[0]
    assert not one_hot(infer(b, token, digit))
    rng = np.random.default_rng(0)
    for i in range(60):  # both replicas' queries, into one shared window
        infer((a, b)[i % 2], token, rng.uniform(0, 16, 64))
    policies = [r.get("output_policy") for gw in (a, b) for r in gw.audit_records() if r.get("kind") == "request"
                and r.get("route") == "infer"]
    # The probe and 49 random queries make 50: that request's replica assessed the shared window and
    # raised the alarm, and it applied on both replicas from there on (12 answers).
    assert policies.count("label_only") == 12 and policies.count(None) == 49
    time.sleep(1.1)
    for gw in (a, b):
        assert one_hot(infer(gw, token, digit)), gw.url
        refused = explain(gw, token, digit)  # the raw prediction and a gradient: not while answers are label-only
        assert refused.status_code == 403 and "explanations of digits are refused" in refused.json()["error"]
    events = [r for gw in (a, b) for r in gw.audit_records() if r.get("kind") == "security-event"]
    assert [e["detector"] for e in events] == ["extraction"] and events[0]["technique"] == "AML.T0024.002"
    principal = events[0]["principal"]

    # The admin API: an operator with a second factor, and nobody else.
    with b.client("admin", token=False, headers={"Authorization": f"Bearer {b.token('admin', mfa=False)}"}) as c:
        assert c.get("/admin/principals").status_code == 401
    with b.client("demo") as c:
        assert c.get("/admin/principals").status_code == 403
        refused = c.post("/admin/principals/clear", json={"principal": principal, "reason": "x"})
        assert refused.status_code == 403
    credentials = operator_credentials(b, tmp_path)
    listed = cli("principals", "list", "--credentials", str(credentials), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [x["principal"] for x in json.loads(listed.stdout)] == [principal]
    missing = cli("principals", "clear", principal, "--credentials", str(credentials))
    assert missing.returncode == 2 and "--reason" in missing.stderr
    # A one-time code signs in once on all replicas (Redis): the CLI's sign-in used this step's, so
    # this one uses the next step's (one step of clock drift is allowed).
    operator = fetch_token(a.url, a.pki, "admin", totp_at=time.time() + 30)
    with b.client("admin", token=False, headers={"Authorization": f"Bearer {operator}"}) as c:
        bad = c.post("/admin/principals/clear", json={"principal": principal})
        assert bad.status_code == 400 and "reason" in bad.json()["detail"]
    cleared = cli("principals", "clear", principal, "--model", "digits", "--reason", "INC-42: a load test, not theft",
                  "--credentials", str(credentials), env={"GATEWAY_TOKEN": operator})
    assert cleared.returncode == 0 and "cleared 1 alarm" in cleared.stdout, cleared.stderr
    time.sleep(1.1)  # the other replica's one-second cache of the alarm
    for gw in (a, b):
        assert not one_hot(infer(gw, token, digit)), gw.url
    assert explain(b, token, digit).status_code == 200
    records = [r for r in b.audit_records() if r.get("path") == "/admin/principals/clear"]
    assert [r["status"] for r in records] == [403, 400, 200]  # every refusal audited too
    action = records[-1]["action"]
    assert action["reason"] == "INC-42: a load test, not theft" and action["cleared"][0]["principal"] == principal
    assert records[-1]["principal"]["subject"] == "admin"


def test_a_redis_outage_watches_locally_without_a_500(replicas: tuple[Redis, list[Gateway]]) -> None:
    redis, (a, _) = replicas
    token = a.token("demo")
    redis.kill()
    try:
        rng = np.random.default_rng(1)
        before = sum(r.get("output_policy") == "label_only" for r in a.audit_records())
        for _ in range(55):
            infer(a, token, rng.uniform(0, 16, 64))
        after = sum(r.get("output_policy") == "label_only" for r in a.audit_records())
        assert after - before == 6  # the local watch raised it at its 50th query
        with a.client(token=False) as c:
            ready = c.get("/v2/health/ready").json()
        assert "monitor storage unreachable" in ready["degraded"]["extraction"]
        assert "extraction-monitor storage unreachable" in a.log.read_text()
    finally:
        redis.start()
