"""schemathesis against the gateway's own OpenAPI document, with a client certificate and a token.

Every check but ``positive_data_acceptance`` runs: that one expects any schema-valid body to be
accepted, and a generic schema cannot say which tensors a given model takes (a schema-valid
request for an unknown input name is rightly a 422). What must hold: no 5xx, every status and
content type documented, every response body matching its schema, invalid input rejected, and
no operation that needs a token answering without one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Gateway, start_gateway

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_errors_and_no_schema_violations(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> None:
    tmp = tmp_path_factory.mktemp("gw-schemathesis")
    gw = start_gateway(pki, tmp, models_root)  # its own gateway: the fuzzing may lock accounts it guesses
    try:
        st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
        assert st, "schemathesis is a test dependency"
        certs = pki / "certs"
        result = subprocess.run(
            [st, "run", f"{gw.url}/openapi.json", "--tls-verify", str(certs / "ca.pem"),
             "--request-cert", str(certs / "client-demo.pem"), "--request-cert-key", str(certs / "client-demo.key"),
             "-H", f"Authorization: Bearer {gw.token('demo')}",
             "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--mode", "all",
             "--max-examples", "30", "--seed", "20261126", "--no-color",
             "--report", "junit", "--report-dir", str(tmp / "report")],
            capture_output=True, text=True, timeout=600, cwd=tmp,  # its cache stays out of the checkout
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert "Traceback" not in gw.log.read_text()  # nothing unhandled on the server side either
    finally:
        gw.stop()


def test_the_document_is_served_without_a_token(gateway: Gateway) -> None:
    with gateway.client(token=False) as c:
        doc = c.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1") and "/v2/models/{name}/infer" in doc["paths"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
