"""What an SRE alerts on, scraped from a running gateway: refusals by the problem type the caller
got, what is degraded, the incident controls in force, certificate expiry, the build, the process."""

from __future__ import annotations

import re
import time

import pytest
from cryptography import x509

from gateway import __version__
from tests.conftest import Gateway

pytestmark = pytest.mark.slow

DIGITS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}


def value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in the scrape")


def test_the_scrape_has_what_alerts_need(gateway: Gateway) -> None:
    with gateway.client("admin") as admin:
        before = admin.get("/metrics").text
    with gateway.client() as c:
        assert c.post("/v2/models/nope/infer", json=DIGITS).status_code == 404
    with gateway.client(token=False) as c:
        assert c.post("/v2/models/digits/infer", json=DIGITS).status_code == 401
    with gateway.client("admin") as admin:
        text = admin.get("/metrics").text

    def grew(**labels: str) -> float:
        try:
            was = value(before, "gateway_refusals_total", **labels)
        except AssertionError:
            was = 0.0
        return value(text, "gateway_refusals_total", **labels) - was

    # An unknown model is a 404 "not-found", apart from an authentication refusal.
    assert grew(route="infer", type="not-found") == 1 and grew(route="infer", type="unauthorized") == 1
    assert value(text, "gateway_build_info", version=__version__) == 1
    assert value(text, "gateway_degraded", area="limits") == 0 and value(text, "gateway_degraded", area="incidents") == 0
    assert value(text, "gateway_incident_controls", kind="lockdown") == 0
    server = x509.load_pem_x509_certificate((gateway.pki / "certs" / "server.pem").read_bytes())
    expiry = value(text, "gateway_certificate_expiry_timestamp_seconds", certificate="server")
    assert expiry == pytest.approx(server.not_valid_after_utc.timestamp())
    assert value(text, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert value(text, "process_open_fds") > 0


def test_workers_report_queue_and_compute_time(gateway: Gateway) -> None:
    with gateway.client() as c:
        for _ in range(5):
            assert c.post("/v2/models/digits/infer", json=DIGITS).status_code == 200
    deadline = time.monotonic() + 10
    while True:  # the pool reads each worker's counters on its health probe
        with gateway.client("admin") as admin:
            text = admin.get("/metrics").text
        compute = value(text, "gateway_worker_compute_seconds_total", model="digits", worker="0")
        if compute > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert 0 < compute < 5
    assert 0 <= value(text, "gateway_worker_queue_seconds_total", model="digits", worker="0") < 5
    assert value(text, "gateway_worker_restarts_total", model="digits", worker="0") == 0
