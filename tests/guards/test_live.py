"""The guard in a running gateway: calibration from the command line, refusals, the audit chain,
metrics, and the signed webhook delivered to a real HTTP receiver across an outage."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.devsetup import model_signing
from gateway.events import verify_signature
from tests.conftest import Gateway, free_port, start_gateway, write_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GUARD = """
[models.digits.guard]
detectors = ["squeeze", "anomaly", "confidence"]
squeezers = ["levels:17"]
target_fpr = 0.05
action = "reject"
"""
SECRET = b"webhook-test-secret-0123456789abcdef"


class Receiver:
    """A SIEM's webhook endpoint: keeps the events whose signature verifies, counts the others."""

    def __init__(self, port: int) -> None:
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if verify_signature(SECRET, body, self.headers.get("gateway-signature", "")):
                    receiver.events += json.loads(body)["events"]
                    self.send_response(204)
                else:
                    receiver.bad_signatures += 1
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def calibrated_models(models_root: Path, tmp: Path, pki: Path) -> Path:
    root = tmp / "models"
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    config = write_config(pki, tmp, root, free_port(), sections=GUARD)
    done = subprocess.run([sys.executable, "-m", "gateway", "models", "calibrate", str(root / "digits" / "1"),
                           "--data", str(ROOT / "models" / "_data" / "digits-calibration.npy"), "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "re-signed" in done.stdout
    return root


def body(rows: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape), "data": rows.reshape(-1).tolist()}]}


def holdout() -> np.ndarray:
    with np.load(ROOT / "models" / "_data" / "digits-holdout.npz") as h:
        return np.asarray(h["x"])


def test_guarded_gateway_refuses_records_counts_and_delivers(pki: Path, tmp_path: Path, models_root: Path) -> None:
    root = calibrated_models(models_root, tmp_path, pki)
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET)
    port = free_port()
    events = f"""
[events]
webhook_url = "http://127.0.0.1:{port}/hook"
webhook_secret_file = "{secret}"
retry_window_s = 60
"""
    gw: Gateway = start_gateway(pki, tmp_path, root, sections=GUARD + events)
    receiver = None
    try:
        x = holdout()
        with gw.client() as c:
            clean = c.post("/v2/models/digits/infer", json=body(x[:4]))
            assert clean.status_code == 200, clean.text
            refused = []
            for i in range(5):  # the receiver is down: these are queued and retried
                r = c.post("/v2/models/digits/infer", json=body(np.clip(x[i:i + 1] + 0.45, 0, 16)))
                refused.append(r)
            for r in refused:
                assert r.status_code == 422, r.text
                problem = r.json()
                assert r.headers["content-type"] == "application/problem+json"
                assert problem["type"].endswith(":adversarial-input") and "error" in problem
                assert "outputs" not in problem and "detector" not in problem and "score" not in problem
            time.sleep(2)  # at least two failed attempts
            with gw.client("admin") as admin:
                failures = re.search(r"^gateway_security_event_delivery_failures_total (\S+)$", admin.get("/metrics").text, re.M)
            assert failures is not None and float(failures.group(1)) >= 2
            assert c.get("/v2/health/ready").json()["degraded"]["events"].startswith("webhook delivery failing")
            receiver = Receiver(port)  # the outage ends within the retry window
            deadline = time.monotonic() + 30
            while len(receiver.events) < 5 and time.monotonic() < deadline:
                time.sleep(0.2)
        with gw.client("admin") as admin:
            metrics = admin.get("/metrics").text
        assert receiver.bad_signatures == 0
        assert sorted(e["request_id"] for e in receiver.events) == sorted(r.headers["x-request-id"] for r in refused)
        assert {e["technique"] for e in receiver.events} <= {"AML.T0043", "AML.T0015"}
        assert 'gateway_security_events_total{action="reject",detector=' in metrics
        assert 'gateway_security_event_deliveries_total{result="delivered"} 5.0' in metrics
        records = gw.audit_records()
        chain_events = [r for r in records if r["kind"] == "security-event"]
        assert sorted(e["event_id"] for e in chain_events) == sorted(e["event_id"] for e in receiver.events)
        request = gw.record_of(refused[0].headers["x-request-id"])
        assert request["status"] == 422 and request["findings"][0]["kind"] == "adversarial-input"
        assert set(request["scores"]) == {"squeeze", "anomaly", "confidence", "combined"}
        clean_record = gw.record_of(clean.headers["x-request-id"])
        assert clean_record["status"] == 200 and "scores" in clean_record and "findings" not in clean_record
    finally:
        gw.stop()
        if receiver is not None:
            receiver.close()
    verify = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "--config", str(gw.config)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_an_unsigned_calibration_is_refused_like_a_tampered_model(pki: Path, tmp_path: Path, models_root: Path) -> None:
    root = calibrated_models(models_root, tmp_path, pki)
    calibration = root / "digits" / "1" / "calibration.json"
    doc = json.loads(calibration.read_text())
    doc["scores"]["anomaly"] = [s * 100 for s in doc["scores"]["anomaly"]]  # loosen the threshold, unsigned
    calibration.write_text(json.dumps(doc))
    with pytest.raises(RuntimeError, match="digits/1: refused"):
        (tmp_path / "second").mkdir()
        start_gateway(pki, tmp_path / "second", root, sections=GUARD)


def test_a_guard_without_calibration_does_not_start(pki: Path, tmp_path: Path, models_root: Path) -> None:
    root = tmp_path / "models"
    for name in ("digits", "resnetish"):  # signed, without calibration.json
        shutil.copytree(models_root / name, root / name, ignore=shutil.ignore_patterns("calibration.json", "model.sig"))
    model_signing(pki / "keys", root)
    with pytest.raises(RuntimeError, match=r"calibration.json: missing"):
        start_gateway(pki, tmp_path, root, sections=GUARD)
