"""``gateway doctor``: clean on a hardened configuration, each finding provoked by the change
that causes it, the demo findings on what ``gateway init`` writes, and a running gateway's state."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.doctor import Finding, diagnose, exit_code
from gateway.security.accounts import IssuerStore
from gateway.security.pki import issue_certificate, make_ca, write_key, write_pem
from tests.conftest import Gateway

pytestmark = pytest.mark.slow

CONFIG = """
[server]
port = 18443
worker_user = "nobody"
debug = false

[tls]
cert_file = "certs/server.pem"
key_file = "certs/server.key"
client_ca_file = "certs/ca.pem"
client_auth = "required"
min_version = "1.3"
trusted_proxies = []

[auth]
require_token = true

[issuer]
directory = "issuer"

[[rbac.rules]]
name = "inference"
roles = ["inference"]
verbs = ["infer", "metadata", "list"]

[[rbac.rules]]
name = "admin"
roles = ["admin"]
verbs = ["*"]

[[rbac.step_up]]
name = "admin-mfa"
verbs = ["admin:*"]
amr_any = ["mfa", "otp", "hwk"]

[limits]
per_address = "100/second"
per_principal = "50/second"
budget_inferences = "100000/day"
storage = "memory://"

[supply]
require_signature = true
trusted_keys = ["{keys}/model-signing.pub"]
signing_key = ""

[audit]
enabled = true
fail_closed = true
directory = "audit"
signing_key = "keys/audit-signing.key"
public_key = "keys/audit-signing.pub"

[models]
root = "models"

[models.digits]
[models.digits.guard]
detectors = ["squeeze", "anomaly", "confidence"]
squeezers = ["levels:17"]
[models.digits.extraction]
enabled = true

[models.resnetish]
[models.resnetish.guard]
detectors = ["squeeze", "anomaly"]
squeezers = ["median:2"]
[models.resnetish.extraction]
enabled = true
"""


def hardened(tmp: Path, pki: Path, models_root: Path, ca_name: str = "Example Corp CA", server_days: int = 90,
             server_start: dt.datetime | None = None) -> Path:
    """A configuration a careful operator would run, with its own CA, keys, issuer and signed models."""
    (tmp / "certs").mkdir(exist_ok=True)
    ca = make_ca(ca_name)
    server = issue_certificate(ca, "gateway.example", server=True, dns=("localhost",), days=server_days,
                               not_before=server_start)
    write_pem(tmp / "certs" / "ca.pem", ca.cert)
    write_pem(tmp / "certs" / "server.pem", server.cert)
    write_key(tmp / "certs" / "server.key", server.key)
    shutil.copytree(pki / "keys", tmp / "keys", dirs_exist_ok=True)
    if not (tmp / "models").exists():
        shutil.copytree(models_root, tmp / "models", ignore=shutil.ignore_patterns("_data"))
    store = IssuerStore(tmp / "issuer")
    store.rotate(keep_retired_s=0)
    store.add_client("billing-service", ["inference"], "the billing team's scorer")
    (tmp / "gateway.toml").write_text(CONFIG.replace("{keys}", str(tmp / "keys")))
    return tmp / "gateway.toml"


def ids(findings: list[Finding]) -> set[str]:
    return {f.id for f in findings}


def edit(old: str, new: str) -> Callable[[Path], None]:
    def change(config: Path) -> None:
        text = config.read_text()
        assert old in text, old
        config.write_text(text.replace(old, new, 1))
    return change


def test_a_hardened_configuration_is_clean(tmp_path: Path, pki: Path, models_root: Path) -> None:
    config = hardened(tmp_path, pki, models_root)
    findings = diagnose(load_config(config, environ={}))
    assert findings == [], findings
    assert exit_code(findings, strict=True) == 0


def _chmod_key(config: Path) -> None:
    os.chmod(config.parent / "certs" / "server.key", 0o644)


def _unsign(config: Path) -> None:
    (config.parent / "models" / "digits" / "1" / "model.sig").unlink()


def _uncalibrate(config: Path) -> None:
    (config.parent / "models" / "resnetish" / "1" / "calibration.json").unlink()


def _demo_credentials(config: Path) -> None:
    store = IssuerStore(config.parent / "issuer")
    secret = store.add_client("demo", ["inference"], "a service calling models")
    (config.parent / "credentials.json").write_text(json.dumps({"principals": {
        "demo": {"client_id": "demo", "client_secret": secret}}}))


def _unreadable_audit_key(config: Path) -> None:
    _break_audit(config)
    (config.parent / "keys" / "audit-signing.pub").write_text("not a key")


def _break_audit(config: Path) -> None:
    stream = config.parent / "audit" / "p0"
    stream.mkdir(parents=True)
    lines = [{"kind": "request", "seq": i, "stream": "p0", "prev": "0" * 64} for i in range(3)]
    (stream / "p0-000000000001.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _scores_as_one_column(config: Path) -> None:
    """A binary classifier's shape: one probability per row, [-1], which no output policy touches."""
    edit("[models.digits.guard]", '[models.digits.output.roles]\npartner = "label_only"\n[models.digits.guard]')(config)
    manifest = config.parent / "models" / "digits" / "1" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["outputs"][0]["shape"] = [-1]
    manifest.write_text(json.dumps(doc))


def _unbatched(config: Path) -> None:
    manifest = config.parent / "models" / "digits" / "1" / "manifest.json"
    doc = json.loads(manifest.read_text())
    del doc["batch"]
    manifest.write_text(json.dumps(doc))


CASES: dict[str, Callable[[Path], None]] = {
    "tls-mtls-not-required": edit('client_auth = "required"', 'client_auth = "optional"'),
    "tls-1.2-accepted": edit('min_version = "1.3"', 'min_version = "1.2"'),
    "trusted-proxies-wildcard": edit("trusted_proxies = []", 'trusted_proxies = ["0.0.0.0/0"]'),
    "debug-mode": edit("debug = false", "debug = true"),
    "workers-not-isolated": edit('worker_user = "nobody"', 'worker_user = ""'),
    "limits-off": edit('per_address = "100/second"\nper_principal = "50/second"', 'per_address = ""\nper_principal = ""'),
    "connections-per-address-unlimited": edit("[server]\n", "[server]\nmax_connections_per_address = 0\n"),
    "budgets-off": edit('budget_inferences = "100000/day"', 'budget_inferences = ""\nbudget_rows = ""'),
    "models-unsigned-accepted": edit("require_signature = true", "require_signature = false"),
    "audit-off": edit("[audit]\nenabled = true", "[audit]\nenabled = false"),
    "audit-fail-open": edit("fail_closed = true", "fail_closed = false"),
    "certificate-only-access": edit("require_token = true", "require_token = false"),
    "private-key-readable": _chmod_key,
    "demo-credentials": _demo_credentials,
    "admin-without-mfa": edit('verbs = ["admin:*"]', 'verbs = ["explain"]'),
    "model-missing": edit("[models.resnetish]\n", '[models.resnetish]\nversion = "7"\n'),
    "model-signature": _unsign,
    "calibration-missing": _uncalibrate,
    "extraction-monitor-off": edit("[models.resnetish.extraction]\nenabled = true", "[models.resnetish.extraction]\nenabled = false"),
    "audit-chain-broken": _break_audit,
    "doctor-check-failed": _unreadable_audit_key,
    "redis-unreachable": edit('storage = "memory://"', 'storage = "redis://127.0.0.1:1/0"'),
    "redis-plaintext": edit('storage = "memory://"', 'storage = "redis://redis.example:6379/0"'),
    "state-per-process": edit("[server]\n", "[server]\nprocesses = 2\n"),
    "output-policy-not-applied": _scores_as_one_column,
    "answers-not-bounded-by-rows": _unbatched,
    "explain-bypasses-hardening": edit("[models.digits.guard]", '[models.digits.output]\npolicy = "label_only"\n[models.digits.guard]'),
}


@pytest.mark.parametrize("finding", sorted(CASES))
def test_each_finding_is_provoked_by_its_cause(finding: str, tmp_path: Path, pki: Path, models_root: Path) -> None:
    config = hardened(tmp_path, pki, models_root)
    CASES[finding](config)
    found = diagnose(load_config(config, environ={}))
    assert finding in ids(found), found
    one = next(f for f in found if f.id == finding)
    assert one.what and one.fix and exit_code(found, strict=True) == 1


@pytest.mark.parametrize("finding,ca,days,start", [
    ("demo-ca", "Gateway Development CA", 90, None),
    ("certificate-expiring", "Example Corp CA", 10, None),
    ("certificate-expired", "Example Corp CA", 1, dt.datetime.now(dt.UTC) - dt.timedelta(days=3)),
])
def test_certificate_findings(finding: str, ca: str, days: int, start: dt.datetime | None, tmp_path: Path, pki: Path,
                              models_root: Path) -> None:
    found = diagnose(load_config(hardened(tmp_path, pki, models_root, ca, days, start), environ={}))
    assert finding in ids(found), found


def test_packages_below_their_floor_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pki: Path,
                                              models_root: Path) -> None:
    import gateway.doctor as doctor

    monkeypatch.setitem(doctor.FLOORS, "numpy", (99, 0, 0))  # a floor nothing installed meets
    found = diagnose(load_config(hardened(tmp_path, pki, models_root), environ={}))
    assert any(f.id == "package-below-floor" and "numpy" in f.what for f in found), found


def test_gateway_init_output_fails_strict_with_the_demo_findings(tmp_path: Path, pki: Path) -> None:
    """On a copy of what `gateway init` wrote for the suite (its demo CA, principals and credentials)."""
    shutil.copytree(pki, tmp_path, dirs_exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "gateway", "doctor", "--config", str(tmp_path / "gateway.toml"),
                          "--strict", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    found = {f["id"] for f in json.loads(out.stdout)["findings"]}
    assert {"demo-ca", "demo-credentials"} <= found


def test_a_running_gateway_is_checked_too(gateway: Gateway) -> None:
    config = load_config(gateway.config, environ={})
    cert = (str(gateway.pki / "certs" / "client-demo.pem"), str(gateway.pki / "certs" / "client-demo.key"))
    found = diagnose(config, gateway.url, str(gateway.pki / "certs" / "ca.pem"), cert)
    assert not {f.id for f in found} & {"gateway-unreachable", "gateway-not-ready"}, found
    assert not any(f.id.startswith("degraded-") for f in found), found
    assert "tls-groups-beyond-modern" not in ids(found)  # gateway serve restricts them
    gone = diagnose(config, "https://localhost:1", str(gateway.pki / "certs" / "ca.pem"), cert)
    assert "gateway-unreachable" in ids(gone)


def test_a_gateway_that_is_not_ready_or_degraded_is_named(tmp_path: Path, pki: Path, models_root: Path) -> None:
    """A stand-in answering readiness as a gateway does while its workers start, then degraded."""
    import http.server
    import ssl
    import threading

    answers = [(503, {"type": "urn:gateway:problem:unavailable"}),
               (200, {"ready": True, "degraded": {"limits": "Redis unreachable, using local limits"}})]

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            status, body = answers[0]
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "certs" / "server.pem", pki / "certs" / "server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = load_config(hardened(tmp_path, pki, models_root), environ={})
        url, ca = f"https://localhost:{server.server_address[1]}", str(pki / "certs" / "ca.pem")
        first = ids(diagnose(config, url, ca))
        # The stand-in is a plain Python TLS server: OpenSSL's default groups (x448, secp521r1, ffdhe).
        assert "gateway-not-ready" in first and "tls-groups-beyond-modern" in first
        answers.pop(0)
        assert "degraded-limits" in ids(diagnose(config, url, ca))
    finally:
        server.shutdown()
        server.server_close()


def test_a_gateway_that_is_not_root_needs_the_image_helper_to_isolate_its_workers(
        tmp_path: Path, pki: Path, models_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container the gateway is not root: its workers are isolated only through
    server.worker_exec (the image's helper); without it the self-audit says so."""
    import os

    config = hardened(tmp_path, pki, models_root)
    monkeypatch.setattr(os, "geteuid", lambda: 10001)
    assert "workers-not-isolated" in ids(diagnose(load_config(config, environ={})))
    helper = tmp_path / "worker-exec"
    helper.write_text("#!/bin/sh\n")
    helper.chmod(0o755)
    found = diagnose(load_config(config, environ={"GATEWAY__SERVER__WORKER_EXEC": str(helper)}))
    assert "workers-not-isolated" not in ids(found)


def test_several_serving_processes_are_clean_only_when_they_share_redis(tmp_path: Path, pki: Path,
                                                                        models_root: Path) -> None:
    config = hardened(tmp_path, pki, models_root)
    edit("[server]\n", "[server]\nprocesses = 4\n")(config)
    alone = next(f for f in diagnose(load_config(config, environ={})) if f.id == "state-per-process")
    assert "4 times" in alone.what and alone.severity == "high"
    edit('storage = "memory://"', 'storage = "redis://127.0.0.1:1/0"')(config)
    assert "state-per-process" not in ids(diagnose(load_config(config, environ={})))
