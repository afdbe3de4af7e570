"""curl, as the README shows it, against a running gateway."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import Gateway, credentials


def _curl(gw: Gateway, *args: str, principal: str | None = "demo") -> subprocess.CompletedProcess[str]:
    certs = gw.pki / "certs"
    auth = ["--cert", str(certs / f"client-{principal}.pem"), "--key", str(certs / f"client-{principal}.key")] if principal else []
    return subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", str(certs / "ca.pem"), *auth, *args],
                          capture_output=True, text=True)


def test_curl_ready_and_infer(gateway: Gateway) -> None:
    ready = _curl(gateway, f"{gateway.url}/v2/health/ready")
    assert ready.returncode == 0 and json.loads(ready.stdout) == {"ready": True}
    demo = credentials(gateway.pki)["demo"]
    issued = _curl(gateway, "-u", f"{demo['client_id']}:{demo['client_secret']}", "-d", "grant_type=client_credentials",
                   f"{gateway.url}/oauth/token")
    token = json.loads(issued.stdout)["access_token"]
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8] * 64}]})
    infer = _curl(gateway, "-H", "content-type: application/json", "-H", f"Authorization: Bearer {token}",
                  f"{gateway.url}/v2/models/digits/infer", "-d", body)
    out = json.loads(infer.stdout)["outputs"][0]
    assert out["name"] == "probabilities" and out["shape"] == [1, 10]
    assert abs(sum(out["data"]) - 1.0) < 1e-5


def test_curl_without_a_client_certificate_gets_no_answer(gateway: Gateway) -> None:
    result = _curl(gateway, f"{gateway.url}/v2/health/ready", principal=None)
    assert result.returncode != 0 and result.stdout == ""
