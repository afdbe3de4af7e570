"""docs/incident-response.md is executable: every command in its ``sh`` blocks runs, in order, in
one shell, against a running gateway, and succeeds (``gateway doctor`` may report findings)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.security.accounts import IssuerStore
from tests.conftest import Gateway, fetch_token, start_gateway

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "incident-response.md"


def commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", RUNBOOK.read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def operated(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Gateway]:
    """A gateway with a private copy of the PKI and issuer (the runbook rotates secrets and keys)."""
    own = tmp_path_factory.mktemp("runbook-pki")
    shutil.copytree(pki, own, dirs_exist_ok=True)
    IssuerStore(own / "issuer").add_user("second-admin", "a long enough password", ["admin"])
    tmp = tmp_path_factory.mktemp("gw-runbook")
    (tmp / "models").symlink_to(models_root)
    gw = start_gateway(own, tmp, models_root)
    yield gw
    gw.stop()


def test_every_command_of_the_runbook_runs(operated: Gateway) -> None:
    gw = operated
    folder = gw.config.parent
    creds = json.loads((gw.pki / "credentials.json").read_text())
    creds["gateway"], creds["token_endpoint"] = gw.url, f"{gw.url}/oauth/token"
    (folder / "credentials.json").write_text(json.dumps(creds))
    token = fetch_token(gw.url, gw.pki, "demo")
    payload = token.split(".")[1]
    cert = x509.load_pem_x509_certificate((gw.pki / "certs" / "client-demo.pem").read_bytes())
    issuer = f"https://localhost:{gw.port}"
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "GATEWAY_URL": gw.url,
        "SSL_CERT_FILE": str(gw.pki / "certs" / "ca.pem"),
        "JTI": json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"],
        "PRINCIPAL": f"{issuer}|demo", "CERT_SHA256": cert.fingerprint(hashes.SHA256()).hex(),
        "ADMIN": "second-admin", "ADMIN_PRINCIPAL": f"{issuer}|second-admin", "NEW_PASSWORD": "another long password",
    }
    lines = commands()
    assert len(lines) >= 25 and any(line.startswith("gateway admin lockdown") for line in lines)
    script = "\n".join(f"{line}\necho \"::rc $? {i}\"" for i, line in enumerate(lines))
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=folder, env=env, timeout=600)
    codes = {int(i): int(rc) for rc, i in re.findall(r"::rc (\d+) (\d+)", run.stdout)}
    assert len(codes) == len(lines), run.stdout[-2000:] + run.stderr[-2000:]
    failed = [(lines[i], rc) for i, rc in codes.items() if rc != 0 and not (lines[i].startswith("gateway doctor") and rc == 1)]
    assert not failed, (failed, run.stderr[-3000:])
    assert "in force on every replica" in run.stdout and "new signing key" in run.stdout
    # What the runbook did is in the audit log, with its reasons, and nothing is left in force.
    reasons = [r["action"]["reason"] for r in gw.audit_records() if r.get("action")]
    assert "INC-2: contained" in reasons and "INC-4: version checked against the training run" in reasons
    status = subprocess.run(["gateway", "admin", "status"], capture_output=True, text=True, cwd=folder,
                            env={**env, "GATEWAY_TOKEN": fetch_token(gw.url, gw.pki, "admin", mfa=False)})
    assert status.returncode == 1  # a password-only token is refused (step-up) ...
    controls = json.loads((folder / "incidents.json").read_text())
    assert controls["lockdown"] is None and not controls["principals"] and not controls["quarantined"]
    assert list(controls["tokens"]) == [env["JTI"]]  # ... and only the revoked token stays revoked
