"""The bad-input table: each malformed or mismatched request gets the right 4xx problem+json,
and the gateway keeps serving."""

from __future__ import annotations

import json

import pytest

from gateway.workers.local import fetch_health
from tests.conftest import Gateway

GOOD = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64}
INFER = "/v2/models/digits/infer"


def _body(**changes: object) -> bytes:
    return json.dumps({"inputs": [{**GOOD, **changes}]}).encode()


def _binary(header_length: str, data: bytes = b"\x00" * 256) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    return header + data, {"Inference-Header-Content-Length": header_length,
                           "Content-Type": "application/octet-stream"}


def _bytes_binary(raw: bytes, count: int = 1) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [count],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


BIN_OK, _ = _binary("0")
HEADER_LEN = str(len(BIN_OK) - 256)

CASES = [
    # id, method, path, body, headers, status
    ("wrong-dtype", "POST", INFER, _body(datatype="INT64", data=[8] * 64), {}, 422),
    ("unknown-dtype", "POST", INFER, _body(datatype="FP128"), {}, 400),
    ("dtype-is-an-object", "POST", INFER, _body(datatype={"a": 1}), {}, 400),
    ("name-is-a-list", "POST", INFER, _body(name=["input"]), {}, 400),
    ("shape-is-a-string", "POST", INFER, _body(shape="1,64"), {}, 400),
    ("wrong-rank", "POST", INFER, _body(shape=[64]), {}, 422),
    ("wrong-dim", "POST", INFER, _body(shape=[1, 65], data=[8.0] * 65), {}, 422),
    ("negative-dim", "POST", INFER, _body(shape=[-1, 64]), {}, 400),
    ("int64-overflow-shape", "POST", INFER, _body(shape=[2**62, 2**62]), {}, 400),
    ("count-not-matching-shape", "POST", INFER, _body(shape=[2, 64]), {}, 400),
    ("ragged-data", "POST", INFER, _body(data=[[1.0], [1.0, 2.0]]), {}, 400),
    ("strings-as-numbers", "POST", INFER, _body(data=["8"] * 64), {}, 400),
    ("nan", "POST", INFER, b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":[NaN' + b",8" * 63 + b"]}]}", {}, 400),
    ("nan-binary", "POST", INFER, _binary(HEADER_LEN, b"\x00\x00\xc0\x7f" * 64)[0], _binary(HEADER_LEN)[1], 422),
    ("inf", "POST", INFER, _body(data=[1e39] + [8.0] * 63), {}, 422),
    ("out-of-domain", "POST", INFER, _body(data=[17.0] + [8.0] * 63), {}, 422),
    ("missing-input", "POST", INFER, _body(name="other"), {}, 422),
    ("unknown-output", "POST", INFER, json.dumps({"inputs": [GOOD], "outputs": [{"name": "x"}]}).encode(), {}, 422),
    ("malformed-json", "POST", INFER, b'{"inputs": [', {}, 400),
    ("json-not-object", "POST", INFER, b"[1, 2]", {}, 400),
    ("no-inputs", "POST", INFER, b'{"inputs": []}', {}, 400),
    ("header-length-past-body", "POST", INFER, _binary("99999")[0], _binary("99999")[1], 400),
    ("header-length-not-a-number", "POST", INFER, _binary("12abc")[0], _binary("12abc")[1], 400),
    ("header-length-splits-json", "POST", INFER, _binary("10")[0], _binary("10")[1], 400),
    ("binary-size-mismatch", "POST", INFER, _binary(HEADER_LEN, b"\x00" * 200)[0], _binary(HEADER_LEN)[1], 400),
    ("gzip-body", "POST", INFER, _body(), {"Content-Encoding": "gzip"}, 415),
    ("unknown-model", "POST", "/v2/models/nope/infer", _body(), {}, 404),
    ("unknown-version", "POST", "/v2/models/digits/versions/7/infer", _body(), {}, 404),
    ("dotdot-encoded-name", "POST", "/v2/models/..%2f..%2fetc/infer", _body(), {}, 404),
    ("dotdot-name", "GET", "/v2/models/%2e%2e", b"", {}, 404),
    ("bad-charset-name", "GET", "/v2/models/a%0d%0aSet-Cookie:x", b"", {}, 404),
    ("wrong-method", "DELETE", INFER, b"", {}, 405),
    ("get-on-infer", "GET", INFER, b"", {}, 405),
    ("unknown-route", "GET", "/admin", b"", {}, 404),
    ("too-large", "POST", INFER, b"{" + b" " * (9 * 1024 * 1024) + b"}", {}, 413),
    ("json-nesting-bomb", "POST", INFER, b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400),
    ("data-nested-deeper-than-shape", "POST", INFER, _body(data=[[[[8.0]]]] * 64), {}, 400),
    ("too-many-elements", "POST", INFER, _body(shape=[1, 70_000_000]), {}, 400),
    ("too-many-tensors", "POST", INFER, json.dumps({"inputs": [{**GOOD, "name": f"i{i}"} for i in range(65)]}).encode(), {}, 400),
    ("unknown-request-parameter", "POST", INFER, json.dumps({"inputs": [GOOD], "parameters": {"priority": 1}}).encode(), {}, 400),
    ("unknown-input-parameter", "POST", INFER, _body(parameters={"shared_memory_region": "x"}), {}, 400),
    ("unknown-output-parameter", "POST", INFER, json.dumps({"inputs": [GOOD], "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}).encode(), {}, 400),
    ("parameter-of-wrong-type", "POST", INFER, json.dumps({"inputs": [GOOD], "parameters": {"binary_data_output": "yes"}}).encode(), {}, 400),
    ("unknown-top-level-field", "POST", INFER, json.dumps({"inputs": [GOOD], "sequence_id": 7}).encode(), {}, 400),
    ("overlong-request-id", "POST", INFER, json.dumps({"inputs": [GOOD], "id": "x" * 300}).encode(), {}, 400),
    ("bytes-to-a-numeric-model", "POST", INFER, _body(datatype="BYTES", data=["a"] * 64), {}, 422),
    # digits takes no BYTES: refused by its signature before the (overrunning) data is read
    ("bytes-element-overruns", "POST", INFER, *_bytes_binary(b"\xff\xff\x00\x00abc"), 422),
    ("bad-charset-version", "GET", "/v2/models/digits/versions/1%0d%0a", b"", {}, 404),
    # a dimension no array can have, even with no elements at all
    ("zero-and-huge-dims", "POST", INFER, _body(shape=[0, 2**63 - 1], data=[]), {}, 400),
    # "²" is a digit to str.isdigit() but not to int()
    ("non-ascii-header-length", "POST", INFER, _binary("0")[0], {**_binary("0")[1], "Inference-Header-Content-Length": b"\xb2"}, 400),
    ("trailing-newline-name", "POST", "/v2/models/digits%0A/infer", _body(), {}, 404),
    ("bytes-flood-to-a-numeric-model", "POST", INFER, *_bytes_binary(b"\0" * 4 * 5000, count=5000), 422),
    ("bytes-json-with-huge-string", "POST", INFER, json.dumps({"inputs": [{"name": "input", "datatype": "BYTES",
     "shape": [1001], "data": ["x" * 20000] + [""] * 1000}]}).encode(), {}, 422),
    ("string-among-numbers", "POST", INFER, _body(data=["x" * 20000] + [8.0] * 63), {}, 400),
    ("dot-version", "GET", "/v2/models/digits/versions/%2e%2e", b"", {}, 404),
    # one output asked for again and again: each copy would be encoded into the answer
    ("output-asked-twice", "POST", INFER, json.dumps({"inputs": [GOOD], "outputs": [{"name": "probabilities"}] * 2}).encode(),
     {}, 400),
    ("output-asked-for-a-quarter-million-times", "POST", INFER,
     json.dumps({"inputs": [GOOD], "outputs": [{"name": "probabilities"}] * 250_000}).encode(), {}, 400),
]


@pytest.mark.parametrize("method,path,body,headers,status", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_problem_json(gateway: Gateway, method: str, path: str, body: bytes,
                                     headers: dict[str, str], status: int) -> None:
    with gateway.client() as c:
        r = c.request(method, path, content=body or None, headers=headers)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["status"] == status
        assert {"type", "title", "detail", "instance"} <= problem.keys()
        if path.startswith("/v2"):
            assert problem["error"] == problem["detail"]  # the OIP "error" field tritonclient reads
        assert r.headers["x-request-id"] == problem["request_id"]
        # ... and the gateway still serves.
        ok = c.post(INFER, content=_body(), headers={"content-type": "application/json"})
        assert ok.status_code == 200


def test_a_clients_request_id_is_a_correlation_id_never_ours(gateway: Gateway) -> None:
    with gateway.client() as c:
        answers = [c.post(INFER, content=_body(), headers={"X-Request-Id": "client-chosen-id-1"}) for _ in range(2)]
    ours = [r.headers["x-request-id"] for r in answers]
    assert len(set(ours)) == 2 and "client-chosen-id-1" not in ours
    for request_id in ours:
        record = gateway.record_of(request_id)
        assert record["correlation_id"] == "client-chosen-id-1" and record["status"] == 200


def test_a_name_with_a_trailing_newline_is_no_model_in_the_record(gateway: Gateway) -> None:
    with gateway.client() as c:
        r = c.post("/v2/models/digits%0A/infer", content=_body())
    assert r.status_code == 404
    assert "\n" not in gateway.record_of(r.headers["x-request-id"]).get("model", "")


def test_no_redirect_is_built_from_the_host_header(gateway: Gateway) -> None:
    with gateway.client() as c:
        r = c.get("/v2/models/", headers={"Host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers
    assert r.headers["content-type"] == "application/problem+json"


def test_chunked_body_over_the_limit_is_refused_while_streaming(gateway: Gateway) -> None:
    def chunks():  # no Content-Length: the limit must be enforced as the body streams in
        for _ in range(40):
            yield b" " * (1024 * 1024)

    with gateway.client() as c:
        r = c.post(INFER, content=chunks())
        assert r.status_code == 413
        assert r.json()["limit"] > 0


def test_too_many_headers_get_431(gateway: Gateway) -> None:
    with gateway.client() as c:
        r = c.get("/v2/health/live", headers={f"x-h{i}": "v" for i in range(150)})
        assert r.status_code == 431
        assert r.headers["content-type"] == "application/problem+json"


def test_error_field_only_on_v2_routes(gateway: Gateway) -> None:
    with gateway.client() as c:
        problem = c.get("/nothing-here").json()
        assert problem["status"] == 404 and problem["type"].endswith("not-found")
        assert "error" not in problem


def test_worker_never_sees_rejected_input(gateway: Gateway) -> None:
    sock = str(gateway.runtime_dir() / "digits-0.sock")
    before = fetch_health(sock)["requests"]  # type: ignore[index]
    with gateway.client() as c:
        for _ in range(5):
            assert c.post(INFER, content=_body(data=[99.0] * 64)).status_code == 422
    assert fetch_health(sock)["requests"] == before  # type: ignore[index]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_operator_action_too_large_is_refused_before_it_is_read(gateway: Gateway, framing: str) -> None:
    """The incident API's bodies are a few fields (at most 4,096 bytes): one declared at 1 GiB was
    awaited whole, and a chunked one read whole, before its size was checked."""
    import socket

    from tests.conftest import client_context

    head = (b"POST /admin/incidents/actions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\n" % gateway.token("admin").encode())
    if framing == "chunked":
        request = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"2000\r\n" + b" " * 0x2000 + b"\r\n"
    else:
        request = head + b"Content-Length: 1073741824\r\n\r\n{"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            client_context(gateway.pki, "admin").wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(request)  # and nothing more: the rest never comes
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            assert chunk, data
            data += chunk
    status = int(data.split(b" ", 2)[1])
    assert status == 413, data[:300]
    assert b"at most 4096 bytes" in data
