"""Bodies built to cost the gateway far more than they cost the sender, against a running gateway.

* memory: the serving process's peak RSS grows by at most a small constant times the body (the
  shapes an attacker used to reach +764 MB from a 204 KB body, +512 MB from a 112-byte one);
* time: while the most expensive bodies are being decoded, the health probe keeps answering
  (one request once held the event loop for 11 s);
* bytes in flight: one principal cannot make the gateway hold many large, slowly sent bodies.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, client_context, start_gateway

INFER = "/v2/models/digits/infer"
MAX_BODY = 40 * 1024 * 1024
AMPLIFICATION = 6
"""The stated bound for the serving process: the body twice while it is read and joined, and its
tensors (8-byte values from 2-byte JSON numbers at most: 4 x); bodies over 64 KiB are decoded in a
decoder process, whose own growth is capped by ``server.decode_memory_mb``."""
SLACK = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def big(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Gateway]:
    gw = start_gateway(pki, tmp_path_factory.mktemp("big"), models_root, max_body=MAX_BODY,
                       extra="body_timeout_s = 20\n")
    yield gw
    gw.stop()


def _peak_rss(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _binary_bytes(count: int, data: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [count],
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}


def _json(inputs: list[dict[str, object]]) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": inputs}).encode(), {"Content-Type": "application/json"}


HOSTILE = [
    ("json-bytes-one-long-string", _json([{"name": "input", "datatype": "BYTES", "shape": [1001],
                                           "data": ["x" * 200_000] + [""] * 1000}])),
    ("binary-bytes-huge-shape-no-data", _binary_bytes(67_108_864, b"")),
    ("binary-bytes-8m-empty-elements", _binary_bytes(8_388_000, b"\0" * 4 * 8_388_000)),
    ("json-long-string-among-numbers", _json([{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                               "data": ["x" * 200_000] + [8.0] * 63}])),
    ("json-empty-lists", (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":['
                          + b"[]," * 4_000_000 + b"[]]}]}", {"Content-Type": "application/json"})),
]


@pytest.mark.parametrize("body,headers", [h[1] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_memory_growth_is_bounded_by_the_body(big: Gateway, body: bytes, headers: dict[str, str]) -> None:
    pid = big.proc.pid  # processes = 1: the serving process is the one started
    with big.client() as c:
        assert c.post(INFER, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                               "data": [1.0] * 64}]}).status_code == 200
        time.sleep(0.2)
        _reset_peak(pid)
        before = _peak_rss(pid)
        r = c.post(INFER, content=body, headers=headers, timeout=60)
        growth = _peak_rss(pid) - before
    assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/problem+json", r.text[:300]
    assert growth <= AMPLIFICATION * len(body) + SLACK, f"+{growth >> 20} MiB for a {len(body)}-byte body"


def test_the_probe_answers_while_the_worst_bodies_are_decoded(big: Gateway) -> None:
    worst = [HOSTILE[2][1], HOSTILE[4][1], HOSTILE[4][1]]
    with big.client(token=False) as probe:
        baseline = []
        for _ in range(10):
            started = time.perf_counter()
            assert probe.get("/v2/health/live").status_code == 200
            baseline.append(time.perf_counter() - started)
        statuses: list[int] = []

        def attack(body: bytes, headers: dict[str, str]) -> None:
            with big.client() as c:
                statuses.append(c.post(INFER, content=body, headers=headers, timeout=120).status_code)

        threads = [threading.Thread(target=attack, args=w) for w in worst]
        for t in threads:
            t.start()
        during = []
        while any(t.is_alive() for t in threads):
            started = time.perf_counter()
            assert probe.get("/v2/health/live").status_code == 200
            during.append(time.perf_counter() - started)
            time.sleep(0.1)  # under the per-address probe limit (20/s)
        for t in threads:
            t.join()
    assert sorted(statuses)[0] >= 400 and len(statuses) == 3
    # A generous bound next to the 11 s one such body once held every client for: no single
    # request may hold the event loop for more than a few milliseconds.
    assert max(during) < max(1.0, 20 * max(baseline)), f"probe took {max(during):.2f} s (baseline {max(baseline):.3f} s)"


def _slow_upload(gw: Gateway, token: str, length: int) -> tuple[socket.socket, ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    tls = client_context(gw.pki, "demo").wrap_socket(raw, server_hostname="localhost")
    tls.sendall((f"POST {INFER} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode() + b"{")
    return raw, tls


def test_one_principal_cannot_hold_many_large_bodies_in_flight(big: Gateway) -> None:
    token = big.token("demo")
    uploads = [_slow_upload(big, token, MAX_BODY - 1) for _ in range(8)]
    refused = 0
    try:
        for _, tls in uploads:
            tls.settimeout(3)
            try:
                head = tls.recv(4096)
            except (TimeoutError, ssl.SSLError):
                continue  # still being read: its bytes are held
            status = int(head.split(b" ", 2)[1])
            assert status == 429 and b"application/problem+json" in head and b"retry-after" in head.lower(), head
            assert b"inflight-body-bytes" in head
            refused += 1
    finally:
        for _, tls in uploads:
            tls.close()
    assert refused >= 5, f"only {refused} of 8 slow {MAX_BODY >> 20} MiB uploads were refused up front"
    with big.client() as c:  # and once they are gone, the principal is served again
        deadline = time.monotonic() + 10
        while c.post(INFER, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                              "data": [1.0] * 64}]}).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
