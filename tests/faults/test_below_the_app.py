"""Requests the HTTP layer refuses before the application sees them still get a problem document and
exactly one audit record; a client that never reads its answers is disconnected."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, client_context, start_gateway


@pytest.fixture(scope="module")
def strict(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Gateway]:
    gw = start_gateway(pki, tmp_path_factory.mktemp("strict"), models_root,
                       extra="header_timeout_s = 2\nwrite_timeout_s = 2\nlimit_concurrency = 6\n")
    yield gw
    gw.stop()


def _connect(gw: Gateway, rcvbuf: int | None = None) -> ssl.SSLSocket:
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(15)
    raw.connect(("127.0.0.1", gw.port))
    return client_context(gw.pki, "demo").wrap_socket(raw, server_hostname="localhost")


def _answer(tls: ssl.SSLSocket) -> tuple[int, dict[str, str], dict[str, object]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += tls.recv(65536)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


REFUSED = [
    ("malformed", b"GARBAGE\r\n\r\n", 400, "bad-request"),
    ("raw-0xff-in-the-path", b"GET /v2/\xff HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, "bad-request"),
    ("too-many-headers", b"GET /v2 HTTP/1.1\r\nHost: localhost\r\n"
     + b"".join(b"x-h%d: v\r\n" % i for i in range(150)) + b"\r\n", 431, "headers-too-large"),
    ("headers-too-slow", b"GET /v2/models HTTP/1.1\r\nHost: loc", 408, "request-timeout"),
    # One long URL or header value, never ended: refused at 64 KiB, not held until the header
    # timeout (one connection grew the process by ~90 MiB in 10 s).
    # RFC 9112 section 3.2: exactly one Host in HTTP/1.1 (a proxy in front could route by the other)
    ("two-host-headers", b"GET /v2/models HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n", 400,
     "bad-request"),
    ("no-host-header", b"GET /v2/models HTTP/1.1\r\n\r\n", 400, "bad-request"),
    ("url-too-long", b"GET /v2/models?x=" + b"a" * 100_000, 431, "headers-too-large"),
    ("header-value-too-long", b"GET /v2/models HTTP/1.1\r\nHost: localhost\r\nx-a: " + b"a" * 100_000,
     431, "headers-too-large"),
]


@pytest.mark.parametrize("raw,status,kind", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refusals_below_the_app_are_problems_with_a_record(strict: Gateway, raw: bytes, status: int, kind: str) -> None:
    with _connect(strict) as tls:
        tls.sendall(raw)
        got, headers, problem = _answer(tls)
        assert tls.recv(1) == b"", "the connection is closed after such a refusal"
    assert got == status and headers["content-type"] == "application/problem+json"
    assert problem["type"] == f"urn:gateway:problem:{kind}" and problem["status"] == status
    assert headers["x-request-id"] == problem["request_id"]
    record = strict.record_of(str(problem["request_id"]))
    assert record["status"] == status and record["reason"]["type"] == kind
    assert record["client"]["cert_sha256"], "the verified certificate is on the record"


def _chunked(gw: Gateway, headers: str, trailers: str) -> bytes:
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64}]})
    return (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"{headers}Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n{body}\r\n0\r\n{trailers}\r\n").encode()


def test_a_chunked_bodys_trailer_fields_never_become_headers(strict: Gateway) -> None:
    """uvicorn appends trailer fields to the headers the application reads after the body: a bearer
    token sent after the body once authenticated the request, and an X-Forwarded-Client-Cert could
    have followed a proxy's own the same way."""
    token = strict.token()
    with _connect(strict) as tls:
        tls.sendall(_chunked(strict, "", f"Authorization: Bearer {token}\r\n"))
        status, headers, problem = _answer(tls)
    assert status == 401 and "bearer token" in str(problem["detail"])
    with _connect(strict) as tls:  # the same token as a header: the request itself is good
        tls.sendall(_chunked(strict, f"Authorization: Bearer {token}\r\n", "X-Request-Id: from-the-trailer\r\n"))
        status, headers, _ = _answer(tls)
    assert status == 200
    assert strict.record_of(headers["x-request-id"]).get("correlation_id") is None
    with _connect(strict) as tls:  # and trailer fields count against the header limits
        tls.sendall(_chunked(strict, f"Authorization: Bearer {token}\r\n",
                             "".join(f"x-t{i}: v\r\n" for i in range(150))))
        status, _, problem = _answer(tls)
    assert status == 431 and problem["type"] == "urn:gateway:problem:headers-too-large"


def _statuses(tls: ssl.SSLSocket, count: int) -> list[int]:
    """The statuses of ``count`` answers on one connection (several may come in one read)."""
    answers = tls.makefile("rb")
    statuses = []
    for _ in range(count):
        line = answers.readline()
        assert line, f"the connection closed after {len(statuses)} answers of {count}"
        statuses.append(int(line.split()[1]))
        length = 0
        while (line := answers.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        answers.read(length)
    return statuses


@pytest.mark.parametrize("requests,padding", [(2, 300_000), (150, 0), (40, 100_000)],
                         ids=["large-bodies", "many-small-requests", "more-than-wait-parsed"])
def test_requests_sent_together_in_one_write_are_not_taken_for_long_heads(strict: Gateway, requests: int,
                                                                          padding: int) -> None:
    """The head limit counts one request's line and headers: requests whose heads and bodies arrive
    together in one write (two with 300 KB bodies; 150 small ones, 100 KB in all) are all answered,
    also past the ``MAX_PIPELINED`` parsed while one is answered (40 of 100 KB)."""
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64}]})
    body += " " * padding
    one = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
           f"Authorization: Bearer {strict.token()}\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
    with _connect(strict) as tls:
        tls.sendall(one * requests)
        statuses = _statuses(tls, requests)
    assert 431 not in statuses and statuses.count(200) == requests, statuses


def test_over_the_concurrency_limit_the_answer_is_a_recorded_problem(strict: Gateway) -> None:
    held = [_connect(strict) for _ in range(6)]  # limit_concurrency = 6: connections count
    try:
        with _connect(strict) as tls:
            tls.sendall(b"GET /v2/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, headers, problem = _answer(tls)
        assert status == 503 and headers["content-type"] == "application/problem+json"
        assert problem["type"] == "urn:gateway:problem:overloaded" and "retry-after" in headers
        assert strict.record_of(str(problem["request_id"]))["status"] == 503
    finally:
        for tls in held:
            tls.close()


def test_a_client_that_never_reads_its_answers_is_disconnected(strict: Gateway) -> None:
    """Pipelined requests whose answers are never read: once the answers back up, the connection
    has ``server.write_timeout_s`` to start reading them, then it is closed and its slot freed."""
    with _connect(strict, rcvbuf=4096) as tls:
        request = b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n"
        tls.sendall(request * 600)  # ~10 MB of answers, more than both sockets' buffers hold
        deadline = time.monotonic() + 20
        while "read none of its answers" not in strict.log.read_text():
            assert time.monotonic() < deadline, "the stalled connection was never closed"
            time.sleep(0.5)
        received = 0
        try:
            while chunk := tls.recv(1 << 20):  # what was in flight, then the end
                received += len(chunk)
        except (ConnectionResetError, ssl.SSLError):
            pass
    assert received < 600 * 15_000, "the server gave up before sending every answer"


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def test_pipelined_requests_are_read_no_faster_than_they_are_answered(strict: Gateway) -> None:
    """One connection pipelines 3,000 requests with 30 KB heads (90 MB) and reads none of its
    answers. uvicorn went back to reading after each answer while requests were still queued, so
    the whole 90 MB was parsed and held (~950 MiB for 200,000 small requests); now at most a few
    dozen are parsed ahead of the answers and the rest wait unread, in the sockets' buffers."""
    request = (b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nx-pad: " + b"p" * 30_000 + b"\r\n\r\n")
    pid = strict.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak from here on
    before = _peak_rss(pid)
    with _connect(strict, rcvbuf=4096) as tls:
        tls.settimeout(8)
        sent = 0
        try:
            for _ in range(3000):
                tls.sendall(request)
                sent += 1
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass  # the server stopped reading (and, past write_timeout_s, closed the connection)
    growth = _peak_rss(pid) - before
    assert growth < 48 * 2**20, f"the serving process grew by {growth / 2**20:.0f} MiB for {sent} requests"
    with strict.client() as c:  # and it still serves (the probes' per-address limit is spent by now)
        assert c.get("/v2/models/digits").status_code == 200


def test_requests_held_back_behind_unread_answers_are_not_timed_as_slow(
        pki: Path, tmp_path: Path, models_root: Path) -> None:
    """400 pipelined requests with large answers, and a client that reads none for 3 s: the
    requests parsed ahead stop at ``MAX_PIPELINED`` and the rest wait unparsed, one of them perhaps
    half parsed. That wait is the server's: the request's header clock (1 s here) stops while it
    lasts, and the client gets every answer once it reads (``write_timeout_s`` is 30 s here)."""
    gw = start_gateway(pki, tmp_path, models_root, extra="header_timeout_s = 1\nwrite_timeout_s = 30\n")
    try:
        with _connect(gw, rcvbuf=4096) as tls:
            tls.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n" * 400)
            time.sleep(3)
            statuses = _statuses(tls, 400)
        assert statuses == [200] * 400
        assert "slower than" not in gw.log.read_text()
    finally:
        gw.stop()
