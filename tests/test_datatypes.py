"""Every Open Inference Protocol datatype through a real gateway and a real worker: a model that
takes one input of each (and answers each back) is called with NVIDIA's tritonclient and the SDK,
in JSON and in binary, and swept with hostile requests. Values come back as they went in; what the
model could read differently from the gateway's checks (a BOOL byte that is neither 0 nor 1, text
that is not UTF-8) is refused with a problem document, never a 500."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from gateway.cli import main
from gateway_client import Client
from gateway_client.protocol.codec import Tensor, decode_infer_response, encode_infer_request
from tests.conftest import Gateway, client_context, credentials_for, model_version, start_gateway

T = TensorProto
SPEC = [  # input name, ONNX type, datatype, width (None: one dimension)
    ("ids", T.INT64, "INT64", 4), ("mask", T.BOOL, "BOOL", 4), ("half", T.FLOAT16, "FP16", 2),
    ("pix", T.UINT8, "UINT8", 3), ("text", T.STRING, "BYTES", None), ("blob", T.STRING, "BYTES", None),
    ("dbl", T.DOUBLE, "FP64", 2), ("small", T.INT8, "INT8", 2), ("i32", T.INT32, "INT32", 2),
    ("u64", T.UINT64, "UINT64", 1),
]
ROWS = 3
VALUES: dict[str, np.ndarray] = {
    "ids": np.arange(ROWS * 4, dtype=np.int64).reshape(ROWS, 4) * 1000,
    "mask": np.array([[True, False, True, False]] * ROWS),
    "half": np.full((ROWS, 2), 1.5, np.float16),
    "pix": np.array([[0, 128, 255]] * ROWS, np.uint8),
    "text": np.array(["héllo".encode(), b"", b"b'quoted'"], dtype=object),
    "blob": np.array([b"\x00\x01", "ünï".encode(), b"plain"], dtype=object),
    "dbl": np.full((ROWS, 2), 0.1, np.float64),
    "small": np.full((ROWS, 2), -128, np.int8),
    "i32": np.full((ROWS, 2), -70000, np.int32),
    "u64": np.full((ROWS, 1), 2**64 - 1, np.uint64),
}
OUTPUTS = [name + "_out" for name, *_ in SPEC] + ["pix_f"]
TEXT_CAP = 64
"""``server.max_bytes_elements`` of the module's gateway: ``text`` and ``blob`` of 32 rows fill it."""


def expected(name: str) -> np.ndarray:
    """What the model answers for ``name``'s value: ``mask`` negated, ``pix_f`` as FP32, the rest as sent."""
    if name == "mask_out":
        return ~VALUES["mask"]
    if name == "pix_f":
        return VALUES["pix"].astype(np.float32)
    return VALUES[name.removesuffix("_out")]


def _every_datatype_model(models_root: Path, root: Path, pki: Path) -> Path:
    """The demo models, and ``types``: Identity for each input (Not for BOOL, and UINT8 cast to FP32
    as well); ``text`` is UTF-8 text, ``blob`` declares ``"encoding": "binary"``."""
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    inputs, outputs, nodes, declared_in, declared_out = [], [], [], [], []
    for name, onnx_type, datatype, width in SPEC:
        shape: list[Any] = ["n", width] if width else ["n"]
        declared = [-1, width] if width else [-1]
        inputs.append(helper.make_tensor_value_info(name, onnx_type, shape))
        outputs.append(helper.make_tensor_value_info(f"{name}_out", onnx_type, shape))
        nodes.append(helper.make_node("Not" if onnx_type == T.BOOL else "Identity", [name], [f"{name}_out"]))
        declared_in.append({"name": name, "datatype": datatype, "shape": declared})
        declared_out.append({"name": f"{name}_out", "datatype": datatype, "shape": declared})
    nodes.append(helper.make_node("Cast", ["pix"], ["pix_f"], to=T.FLOAT))
    outputs.append(helper.make_tensor_value_info("pix_f", T.FLOAT, ["n", 3]))
    declared_out.append({"name": "pix_f", "datatype": "FP32", "shape": [-1, 3]})
    declared_in[0]["domain"] = {"min": 0, "max": 100_000}
    declared_in[5]["encoding"] = "binary"
    model_version(root / "types" / "1", helper.make_graph(nodes, "types", inputs, outputs), declared_in, declared_out,
                  pki / "keys" / "model-signing.key")
    return root


@pytest.fixture(scope="module")
def types_gateway(models_root: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("types")
    root = _every_datatype_model(models_root, tmp / "models", pki)
    gw = start_gateway(pki, tmp, root, extra=f"max_bytes_elements = {TEXT_CAP}\n",
                       sections="[models.types]\nmax_batch_size = 16\nmax_queue_delay_ms = 5\n")
    yield gw
    gw.stop()


def _binary_body(parts: list[tuple[str, str, list[int], bytes]]) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                                    for n, d, s, b in parts]}).encode()
    return header + b"".join(b for *_, b in parts), {"Inference-Header-Content-Length": str(len(header)),
                                                      "Content-Type": "application/octet-stream"}


def _raw(name: str, array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(len(e).to_bytes(4, "little") + e for e in array)
    return array.tobytes()


@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, True), (True, False), (False, True)])
def test_every_datatype_round_trips_through_tritonclient(types_gateway: Gateway, binary_in: bool, binary_out: bool) -> None:
    client = httpclient.InferenceServerClient(url=f"localhost:{types_gateway.port}", ssl=True,
                                              ssl_context_factory=lambda: client_context(types_gateway.pki))
    try:
        inputs = []
        for name, _, datatype, _ in SPEC:
            tensor = httpclient.InferInput(name, list(VALUES[name].shape), datatype)
            tensor.set_data_from_numpy(VALUES[name], binary_data=binary_in)
            inputs.append(tensor)
        result = client.infer("types", inputs, outputs=[httpclient.InferRequestedOutput(o, binary_data=binary_out)
                                                        for o in OUTPUTS], headers=types_gateway.auth("demo"))
        for name in OUTPUTS:
            got, want = result.as_numpy(name), expected(name)
            assert got is not None and got.shape == want.shape, name
            if want.dtype == object:  # tritonclient answers text as bytes from binary data, as str from JSON
                got = np.array([e if isinstance(e, bytes) else e.encode() for e in got], dtype=object)
            else:
                assert got.dtype == want.dtype, name
            assert (got == want).all(), f"{name}: {got!r}"
    finally:
        client.close()


def test_every_datatype_round_trips_through_the_sdk(types_gateway: Gateway) -> None:
    with Client(types_gateway.url, types_gateway.token(), ssl_context=client_context(types_gateway.pki)) as client:
        as_str = np.array([e.decode() for e in VALUES["text"]])  # numpy's fixed-width str, as most callers write text
        for binary in (True, False):
            answer = client.infer("types", {**VALUES, "text": as_str}, binary=binary)
            for name in OUTPUTS:
                assert answer[name].dtype == expected(name).dtype, name
                assert (answer[name] == expected(name)).all(), f"{name}: {answer[name]!r}"


def test_the_infer_command_prints_and_saves_every_datatype(types_gateway: Gateway, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``gateway infer`` with text in an .npz and in a .json file: BYTES outputs printed as text
    and saved as numpy str arrays (an .npz that loads without pickle)."""
    creds = credentials_for(types_gateway, tmp_path)
    as_text = {**VALUES, **{n: np.array([e.decode() for e in VALUES[n]]) for n in ("text", "blob")}}
    np.savez(tmp_path / "x.npz", **as_text)  # type: ignore[arg-type]
    (tmp_path / "x.json").write_text(json.dumps({n: a.tolist() for n, a in as_text.items()}))
    for source, encoding in (("x.npz", []), ("x.json", ["--json-tensors"])):
        assert main(["infer", "types", "--input", str(tmp_path / source), "--credentials", str(creds), *encoding]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["text_out"]["data"] == ["héllo", "", "b'quoted'"], source
        assert printed["ids_out"]["data"] == VALUES["ids"].tolist() and printed["u64_out"]["data"] == [[2**64 - 1]] * ROWS
    assert main(["infer", "types", "--input", str(tmp_path / "x.npz"), "--credentials", str(creds),
                 "--output", str(tmp_path / "out.npz")]) == 0
    saved = np.load(tmp_path / "out.npz")  # allow_pickle is off
    assert saved["text_out"].tolist() == ["héllo", "", "b'quoted'"] and saved["blob_out"].tolist() == ["\x00\x01", "ünï", "plain"]
    assert saved["half_out"].dtype == np.float16 and (saved["mask_out"] == ~VALUES["mask"]).all()


def _own_values(k: int) -> dict[str, np.ndarray]:
    """Request ``k``'s inputs: 1 to 3 rows, its number in ``ids``, ``text`` and ``mask``."""
    rows = 1 + k % 3
    values = {name: np.repeat(VALUES[name][:1], rows, axis=0) for name, *_ in SPEC}
    values["ids"] = (k * 10 + np.arange(rows)[:, None] + np.zeros((1, 4), np.int64)).astype(np.int64)
    values["text"] = np.array([f"request {k}, row {r}".encode() for r in range(rows)], dtype=object)
    values["mask"] = np.array([[(k + r + j) % 2 == 0 for j in range(4)] for r in range(rows)])
    return values


def test_requests_batched_together_each_get_their_own_rows(types_gateway: Gateway) -> None:
    """Requests of 1 to 3 rows, many at once, share the worker's batches (text and all): each
    answer holds its own rows, no other request's."""
    async def one(client: Any, k: int) -> None:
        values = _own_values(k)
        body, length = encode_infer_request([Tensor(n, a) for n, a in values.items()])
        answer = await client.post("/v2/models/types/infer", content=body,
                                   headers={"Inference-Header-Content-Length": str(length)})
        assert answer.status_code == 200, answer.text
        _, tensors = decode_infer_response(answer.content, int(answer.headers["inference-header-content-length"]))
        got = {t.name: t.array for t in tensors}
        assert (got["ids_out"] == values["ids"]).all() and list(got["text_out"]) == list(values["text"]), k
        assert (got["mask_out"] == ~values["mask"]).all(), k

    async def rounds() -> None:
        async with types_gateway.async_client() as client:
            for _ in range(4):
                await asyncio.gather(*(one(client, k) for k in range(48)))

    asyncio.run(rounds())
    with types_gateway.client("admin") as c:
        metrics = c.get("/metrics").text
    batches = {line.split("le=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("gateway_batch_size_bucket") and 'model="types"' in line}
    assert batches["+Inf"] > batches["1"], f"no batch held two requests: {batches}"


def test_a_bool_byte_other_than_0_or_1_is_refused(types_gateway: Gateway) -> None:
    """numpy reads a byte of 2 as true, ONNX Runtime's Not answered it as true as well: the gateway's
    checks and the model would see two different tensors."""
    parts = [(name, datatype, list(VALUES[name][:1].shape), _raw(name, VALUES[name][:1])) for name, _, datatype, _ in SPEC]
    parts[1] = ("mask", "BOOL", [1, 4], bytes([2, 255, 0, 1]))
    body, headers = _binary_body(parts)
    with types_gateway.client() as c:
        refused = c.post("/v2/models/types/infer", content=body, headers=headers)
        as_json = c.post("/v2/models/types/infer", json={"inputs": [
            {"name": n, "datatype": d, "shape": list(VALUES[n][:1].shape),
             "data": [1, 0, 1, 0] if n == "mask" else (["x"] if d == "BYTES" else VALUES[n][:1].reshape(-1).tolist())}
            for n, _, d, _ in SPEC]})
    assert refused.status_code == 400, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert "0 or 1" in refused.json()["error"] and "mask" in refused.json()["error"]
    assert as_json.status_code == 400 and "BOOL" in as_json.json()["error"], as_json.text  # JSON: true/false only
    assert types_gateway.record_of(refused.headers["x-request-id"])["status"] == 400


def test_more_text_elements_than_the_gateway_takes_are_refused_from_the_shapes(types_gateway: Gateway) -> None:
    def request(rows: int) -> tuple[bytes, dict[str, str]]:
        parts = [(n, d, list(VALUES[n][:1].shape), _raw(n, VALUES[n][:1])) for n, _, d, _ in SPEC]
        return _binary_body([(n, d, [rows, *s[1:]], b * rows) for n, d, s, b in parts])

    with types_gateway.client() as c:
        full = c.post("/v2/models/types/infer", content=request(TEXT_CAP // 2)[0], headers=request(TEXT_CAP // 2)[1])
        over = c.post("/v2/models/types/infer", content=request(TEXT_CAP // 2 + 1)[0],
                      headers=request(TEXT_CAP // 2 + 1)[1])
    assert full.status_code == 200, full.text
    assert over.status_code == 400 and f"more than {TEXT_CAP} BYTES elements" in over.json()["error"], over.text
    assert types_gateway.record_of(over.headers["x-request-id"])["status"] == 400


def test_binary_text_that_onnx_runtime_cannot_take_is_refused_by_name(types_gateway: Gateway) -> None:
    """ONNX Runtime's Python API takes string tensors as text: bytes that are not UTF-8 cannot reach
    the model intact, even where the manifest allows them (``"encoding": "binary"``)."""
    parts = [(name, datatype, list(VALUES[name][:1].shape), _raw(name, VALUES[name][:1])) for name, _, datatype, _ in SPEC]
    parts[5] = ("blob", "BYTES", [1], _raw("blob", np.array([b"ok\xff"], dtype=object)))
    body, headers = _binary_body(parts)
    with types_gateway.client() as c:
        refused = c.post("/v2/models/types/infer", content=body, headers=headers)
    assert refused.status_code == 422, refused.text
    problem = refused.json()
    assert "blob" in problem["error"] and "UTF-8" in problem["error"], problem
    record = types_gateway.record_of(refused.headers["x-request-id"])
    assert record["status"] == 422 and record["outcome"] == "rejected"


def _value(datatype: str, rng: random.Random, hostile: bool) -> Any:
    if datatype == "BYTES":
        return rng.choice(["", "héllo", "x" * 50, "\u0000", "😀"])
    if datatype == "BOOL":
        return rng.choice([True, False] + ([1, 0, None, "true"] if hostile else []))
    if datatype.startswith("FP"):
        return rng.choice([0.5, -1.25, 3.0] + ([1e300, -1e300, 70000.0, True, None] if hostile else []))
    return rng.choice([0, 1, 7, 100] + ([-1, 256, 2**63, -2**63 - 1, 2**64, 1.5, True, 1e10] if hostile else []))


def _sweep_body(rng: random.Random, hostile: bool) -> tuple[bytes, dict[str, str]]:
    """A request for ``types``: JSON or binary per input, and when hostile, wrong values, shapes,
    datatypes, truncated or random binary data and nested lists."""
    rows = rng.choice([0, 1, 3])
    items, raw = [], []
    for name, _, datatype, width in SPEC:
        shape = [rows, width] if width else [rows]
        values = [_value(datatype, rng, hostile and rng.random() < 0.3) for _ in range(rows * (width or 1))]
        item: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if hostile and rng.random() < 0.1:
            item["shape"] = rng.choice([[rows], [rows, (width or 1) + 1], [-1, width or 1], [], [rows, 0]])
        if hostile and rng.random() < 0.05:
            item["datatype"] = rng.choice(["FP32", "BYTES", "BOOL", "UINT64"])
        if rng.random() < 0.5:
            try:
                with warnings.catch_warnings():  # a hostile value may not fit: random bytes instead
                    warnings.simplefilter("error")
                    data = (b"".join(len(v.encode()).to_bytes(4, "little") + v.encode() for v in values)
                            if datatype == "BYTES" else np.array(values, dtype=np.dtype(_NUMPY[datatype])).tobytes())
            except (TypeError, ValueError, OverflowError, AttributeError, RuntimeWarning):
                data = rng.randbytes(len(values) * 2)
            if hostile and rng.random() < 0.1:
                data = data[:-1] if data else b"\x00"
            if hostile and rng.random() < 0.1:
                data = rng.randbytes(len(data))
            item["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            item["data"] = values
            if hostile and rng.random() < 0.1 and width and rows:
                item["data"] = [values[i * width:(i + 1) * width] for i in range(rows)]
        items.append(item)
    doc: dict[str, Any] = {"inputs": items}
    if rng.random() < 0.5:
        doc["outputs"] = [{"name": o, "parameters": {"binary_data": rng.random() < 0.5}}
                          for o in rng.sample(OUTPUTS, rng.randint(1, 4))]
    header = json.dumps(doc).encode()
    if raw:
        return header + b"".join(raw), {"Inference-Header-Content-Length": str(len(header))}
    return header, {"Content-Type": "application/json"}


_NUMPY = {"INT64": np.int64, "BOOL": np.bool_, "FP16": np.float16, "UINT8": np.uint8, "FP64": np.float64,
          "INT8": np.int8, "INT32": np.int32, "UINT64": np.uint64}


@pytest.mark.parametrize("policy", ["full", "label_only", "noised"])
def test_hostile_requests_to_every_datatype_get_problem_documents(
        models_root: Path, pki: Path, tmp_path: Path, policy: str) -> None:
    """Valid and hostile requests, every route and output policy: answers or problem documents with
    ``"error"``, never a 5xx, and every answer keeps its declared datatypes and shapes."""
    root = _every_datatype_model(models_root, tmp_path / "models", pki)
    gw = start_gateway(pki, tmp_path, root, sections=f'[models.types]\noutput = {{ policy = "{policy}" }}\n')
    rng = random.Random(policy)
    declared = {name: datatype for name, _, datatype, _ in SPEC} | {"pix_f": "FP32"}
    statuses: dict[int, int] = {}
    try:
        with gw.client() as c:
            for i in range(240):
                body, headers = _sweep_body(rng, hostile=i % 2 == 1)
                route = "explain" if rng.random() < 0.1 else "infer"
                r = c.post(f"/v2/models/types/{route}", content=body, headers=headers)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (route, r.text, body[:300])
                if r.status_code >= 400:
                    assert r.json()["error"], r.text
                elif "application/json" in r.headers["content-type"]:
                    for out in r.json()["outputs"]:
                        assert out["datatype"] == declared[out["name"].removesuffix("_out")], out
        assert statuses.get(200, 0) > 40 and statuses.get(400, 0) > 40 and statuses.get(422, 0) > 40, statuses
        assert "Traceback" not in (tmp_path / "gateway.log").read_text()
    finally:
        gw.stop()
