"""The Open Inference Protocol codecs: JSON and binary tensors, round trips and refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from gateway_client.protocol import (
    DecodeLimits,
    Tensor,
    decode_infer_request,
    decode_tensor_message,
    encode_infer_response,
    encode_tensor_message,
)
from gateway_client.protocol.codec import encode_infer_request
from gateway_client.protocol.errors import ProtocolError

ALL_TYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_binary_message_round_trip(datatype: str) -> None:
    from gateway_client.protocol.datatypes import numpy_dtype

    array = (np.arange(12) % 2 if datatype == "BOOL" else np.arange(12)).astype(numpy_dtype(datatype)).reshape(3, 4)
    body, n = encode_tensor_message("inputs", [Tensor("x", array)])
    (back,) = decode_tensor_message(body, n, "inputs")
    assert back.datatype == datatype
    np.testing.assert_array_equal(back.array, array)


@pytest.mark.parametrize("datatype", [*ALL_TYPES, "BYTES"])
@pytest.mark.parametrize("shape", [(0,), (1, 0), (0, 4), (2, 0, 3)])
def test_tensors_with_no_elements_round_trip(datatype: str, shape: tuple[int, ...]) -> None:
    from gateway_client.protocol.datatypes import numpy_dtype

    array = np.empty(shape, dtype=object if datatype == "BYTES" else numpy_dtype(datatype))
    body, n = encode_tensor_message("outputs", [Tensor("x", array), Tensor("y", np.arange(3, dtype=np.int32))])
    assert body[n:] == np.arange(3, dtype=np.int32).tobytes(), "no bytes for the empty tensor"
    empty, after = decode_tensor_message(body, n, "outputs")
    assert (empty.datatype, empty.array.shape) == (datatype, shape)
    assert after.array.tolist() == [0, 1, 2]
    answer, m = encode_infer_response("m", "1", [Tensor("x", array)], binary={"x"})
    assert decode_tensor_message(answer, m, "outputs")[0].array.shape == shape


def test_bytes_round_trip_with_length_prefixes() -> None:
    array = np.array([b"a", b"", "é".encode()], dtype=object)
    body, n = encode_tensor_message("outputs", [Tensor("s", array)])
    assert body[n:] == struct.pack("<I", 1) + b"a" + struct.pack("<I", 0) + struct.pack("<I", 2) + "é".encode()
    (back,) = decode_tensor_message(body, n, "outputs")
    assert list(back.array) == list(array)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("array", [np.array([["ab", "c"], ["é", ""]]), np.array([[b"ab", b"c"], ["é".encode(), b""]])],
                         ids=["str", "bytes"])
def test_fixed_width_numpy_strings_are_sent_as_bytes(array: np.ndarray, binary: bool) -> None:
    """``np.array(["text"])`` is a fixed-width str array, not an object array: still BYTES elements."""
    body, n = encode_infer_request([Tensor("s", array)], binary=binary)
    (back,) = decode_infer_request(body, n).inputs
    assert back.datatype == "BYTES" and back.array.shape == (2, 2)
    assert back.array.tolist() == [[b"ab", b"c"], ["é".encode(), b""]]


def test_bytes_elements_are_counted_across_tensors_before_any_data_is_read() -> None:
    limits = DecodeLimits(max_bytes_elements=5)
    tensors = [{"name": "a", "datatype": "BYTES", "shape": [3], "data": ["x", "y", "z"]},
               {"name": "b", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": 0}}]
    header = json.dumps({"inputs": tensors}).encode()
    with pytest.raises(ProtocolError, match=r"inputs\['b'\]: more than 5 BYTES elements in one message \(6 so far\)"):
        decode_infer_request(header, len(header), limits)  # b's data is missing: never looked at
    tensors[1] = {"name": "b", "datatype": "BYTES", "shape": [2], "data": ["v", "w"]}
    assert len(decode_infer_request(json.dumps({"inputs": tensors}).encode(), None, limits).inputs) == 2


def test_null_is_nan_in_an_answer_and_refused_in_a_request() -> None:
    from gateway_client.protocol.codec import decode_infer_response

    tensor = {"name": "y", "datatype": "FP32", "shape": [3], "data": [1.0, None, 2.0]}
    _, (y,) = decode_infer_response(json.dumps({"outputs": [tensor]}).encode(), None)
    assert y.array[0] == 1.0 and np.isnan(y.array[1]) and y.array.dtype == np.float32
    with pytest.raises(ProtocolError, match="NoneType values, not FP32"):
        decode_infer_request(json.dumps({"inputs": [{**tensor, "name": "x"}]}).encode(), None)
    with pytest.raises(ProtocolError, match="NoneType values, not INT32"):  # no NaN in integers
        decode_infer_response(json.dumps({"outputs": [{**tensor, "datatype": "INT32", "data": [1, None, 2]}]}).encode(), None)


def test_json_request_with_nested_data_and_outputs() -> None:
    doc = {"id": "r1", "inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}],
           "outputs": [{"name": "y", "parameters": {"binary_data": True}}], "parameters": {"binary_data_output": False}}
    req = decode_infer_request(json.dumps(doc).encode(), None)
    assert req.id == "r1" and req.outputs[0].binary is True and req.binary_output is False
    np.testing.assert_array_equal(req.inputs[0].array, [[1, 2], [3, 4]])


def test_mixed_json_and_binary_inputs() -> None:
    header = json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
        {"name": "b", "datatype": "INT8", "shape": [1], "data": [5]},
    ]}).encode()
    req = decode_infer_request(header + np.array([1.5, 2.5], np.float32).tobytes(), len(header))
    np.testing.assert_array_equal(req.inputs[0].array, [1.5, 2.5])
    assert req.inputs[1].array.tolist() == [5]


@pytest.mark.parametrize(
    "doc,fragment",
    [
        ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}, "range"),
        ({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}, "holds int values, not BOOL"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [True], "data": [1.0]}]}, "non-negative"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1] * 9, "data": [1.0]}]}, "at most"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, "neither"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}] * 2}, "unique"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": 1.0}]}, "must be a list"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "id": 5}, "'id'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "parameters": []}, "parameters"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "outputs": [3]}, "outputs[0]"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "outputs": [{"name": "y"}] * 2},
         "outputs[1] asks for 'y' again"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
          "outputs": [{"name": f"y{i}"} for i in range(65)]}, "at most 64 outputs"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "outputs": {"name": "y"}},
         "at most 64 outputs"),
    ],
    ids=["int-overflow", "bool-from-int", "bool-dim", "rank", "no-data", "duplicate", "scalar-data", "id-type",
         "params-type", "output-type", "duplicate-output", "too-many-outputs", "outputs-not-a-list"],
)
def test_malformed_json_requests_are_refused(doc: dict[str, object], fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        decode_infer_request(json.dumps(doc).encode(), None)


def test_element_limit_applies_before_allocation() -> None:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1 << 20, 1 << 20], "parameters": {"binary_data_size": 4}}]}
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_infer_request(json.dumps(doc).encode() + b"\0" * 4, len(json.dumps(doc)), DecodeLimits())


@pytest.mark.parametrize("payload", [b"\x05\x00\x00\x00ab", b"\x01\x00\x00\x00a\x00", b"\x01\x00"], ids=["short", "trailing", "cut-prefix"])
def test_malformed_bytes_elements(payload: bytes) -> None:
    header = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(payload)}}]}).encode()
    with pytest.raises(ProtocolError):
        decode_infer_request(header + payload, len(header))


@pytest.mark.parametrize(("payload", "refused"), [(b"\x00\x01\x01", None), (b"\x00\x02\x01", 2), (b"\xff", 255)])
def test_binary_bool_elements_are_bytes_0_or_1(payload: bytes, refused: int | None) -> None:
    header = json.dumps({"inputs": [{"name": "b", "datatype": "BOOL", "shape": [len(payload)],
                                     "parameters": {"binary_data_size": len(payload)}}]}).encode()
    if refused is None:
        assert decode_infer_request(header + payload, len(header)).inputs[0].array.tolist() == [False, True, True]
        return
    with pytest.raises(ProtocolError, match=f"BOOL elements must be bytes 0 or 1, found {refused}"):
        decode_infer_request(header + payload, len(header))


def test_response_json_and_binary_outputs() -> None:
    a = np.array([[0.25, 0.75]], np.float32)
    b = np.array([1, 2], np.int64)
    body, n = encode_infer_response("m", "1", [Tensor("a", a), Tensor("b", b)], {"b"}, request_id="q")
    assert n is not None
    doc = json.loads(body[:n])
    assert doc["id"] == "q" and doc["model_name"] == "m"
    assert doc["outputs"][0]["data"] == [0.25, 0.75]
    assert doc["outputs"][1]["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(body[n:], np.int64).tolist() == [1, 2]
    json_only, none = encode_infer_response("m", "1", [Tensor("a", a)], set())
    assert none is None and json.loads(json_only)["outputs"][0]["shape"] == [1, 2]
