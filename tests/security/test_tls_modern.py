"""sslyze's check against Mozilla's "modern" TLS configuration, on a live gateway: the only finding
allowed is the development CA's, which no public trust store holds."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.slow

SSLYZE = Path(__file__).resolve().parents[1] / "tls" / ".venv" / "bin" / "sslyze"


def test_mozilla_modern_holds_but_for_the_private_ca(gateway: Gateway) -> None:
    if not SSLYZE.exists():
        pytest.fail(f"{SSLYZE} is needed: `make test-tools` installs it (tests/tls/sslyze.lock)")
    certs = gateway.pki / "certs"
    out = subprocess.run([str(SSLYZE), "--mozilla_config=modern", "--cert", str(certs / "client-demo.pem"),
                          "--key", str(certs / "client-demo.key"), f"localhost:{gateway.port}"],
                         capture_output=True, text=True, timeout=300)
    report = out.stdout
    assert "SCANS COMPLETED" in report, report[-2000:] + out.stderr[-2000:]
    curves = re.search(r"Supported curves:\s+(.*)", report)
    assert curves is not None and curves.group(1).split(", ") == ["X25519", "secp256r1", "secp384r1"], report
    compliance = report[report.index("COMPLIANCE AGAINST TLS CONFIGURATION"):]
    findings = re.findall(r"^\s+\* (\w+):", compliance, re.M)
    assert findings == ["certificate_path_validation"], compliance
    assert "Certificate path validation failed for CN=localhost" in compliance
