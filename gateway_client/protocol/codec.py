"""Decoding and encoding of inference requests and responses.

Two encodings: JSON tensors (``"data"`` lists) and the binary tensor extension, where a JSON
header of ``Inference-Header-Content-Length`` bytes is followed by the raw tensor bytes in the
order of the tensors whose ``parameters.binary_data_size`` is set.
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md

Everything here is plain values: a malformed message raises ``ProtocolError`` naming the offending
field, and nothing here knows a web framework.

Decoding costs at most a small constant times the body: every shape is bounded (each dimension
and their product by ``max_elements``) and checked against the data actually present (the
element count of a JSON list, the byte count of binary data, four bytes at least per ``BYTES``
element) before any array is allocated, and an ``expect`` callback (the model's signature) may
refuse a tensor by its name, datatype and shape before its data is read at all. JSON lists are
checked for their structure and element types in plain Python and converted straight into the
declared datatype, never through numpy's type inference (a stray string would make numpy build
a fixed-width unicode array as wide as the longest string for every element).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from gateway_client.protocol.datatypes import DATATYPES, TEXT_KINDS, datatype_of
from gateway_client.protocol.elements import from_binary, from_json
from gateway_client.protocol.errors import ProtocolError

__all__ = [
    "HEADER_LENGTH",
    "DecodeLimits",
    "Expect",
    "InferRequest",
    "RequestedOutput",
    "Tensor",
    "decode_infer_request",
    "decode_tensor_message",
    "encode_infer_response",
    "encode_tensor_message",
    "encode_tensor_parts",
]


# The binary tensor extension's header: the byte length of the JSON part of the body.
HEADER_LENGTH = "inference-header-content-length"


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds applied while decoding, before any tensor memory is allocated."""

    max_tensors: int = 64
    max_rank: int = 8
    max_elements: int = 64 * 1024 * 1024
    max_bytes_element: int = 1024 * 1024
    max_bytes_elements: int = 64 * 1024 * 1024
    """BYTES elements in one message, all tensors together: each costs a Python-level step to
    decode, check, digest and encode, where a number costs a share of a vectorized pass."""


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    array: np.ndarray

    @property
    def datatype(self) -> str:
        return datatype_of(self.array)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None


@dataclass(slots=True)
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_output(self) -> bool:
        return bool(self.parameters.get("binary_data_output", False))


def _split(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    rest = memoryview(b"")
    if header_length is None:
        header = body
    else:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length is {header_length} but the body has "
                f"{len(body)} bytes",
                field="Inference-Header-Content-Length",
            )
        # The tensor bytes stay a view: a large body is not copied again.
        header, rest = body[:header_length], memoryview(body)[header_length:]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"request body is not valid JSON: {exc}", field="body") from None
    if not isinstance(doc, dict):
        raise ProtocolError("request body must be a JSON object", field="body")
    return doc, rest


def _shape(item: dict[str, Any], where: str, limits: DecodeLimits) -> tuple[tuple[int, ...], int]:
    shape = item.get("shape")
    if not isinstance(shape, list) or len(shape) > limits.max_rank:
        raise ProtocolError(f"{where}.shape must be a list of at most {limits.max_rank} integers", field=where)
    count = 1
    for dim in shape:
        # bool is an int in Python; a shape of [true] is still malformed. Each dimension is bounded
        # on its own too: [0, 2**63 - 1] has no elements but no array can have that shape.
        if type(dim) is not int or dim < 0:
            raise ProtocolError(f"{where}.shape must hold non-negative integers, got {shape}"[:300], field=where)
        count *= dim
        if dim > limits.max_elements or count > limits.max_elements:
            raise ProtocolError(f"{where}.shape {shape} exceeds {limits.max_elements} elements"[:300], field=where)
    return tuple(shape), count


# What a request may carry in ``parameters``; anything else is refused by name, not ignored.
REQUEST_PARAMETERS = frozenset({"binary_data_output"})
INPUT_PARAMETERS = frozenset({"binary_data_size"})
OUTPUT_PARAMETERS = frozenset({"binary_data"})


def _parameters(params: Any, allowed: frozenset[str], where: str) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{where} must be an object", field=where)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ProtocolError(f"{where}: parameter {unknown[0][:64]!r} is not accepted "
                         f"(accepted: {', '.join(sorted(allowed))})", field=where)
    for name in ("binary_data_output", "binary_data"):
        if name in params and not isinstance(params[name], bool):
            raise ProtocolError(f"{where}.{name} must be true or false", field=where)
    return params


Expect = Callable[[str, str, tuple[int, ...]], None]
"""Called with each tensor's name, datatype and shape before its data is read; raises to refuse it."""


def _tensors(
    items: Any, raw: memoryview, key: str, limits: DecodeLimits, expect: Expect | None = None, nulls: bool = False
) -> list[Tensor]:
    if not isinstance(items, list) or not items or len(items) > limits.max_tensors:
        raise ProtocolError(f"'{key}' must be a list of 1 to {limits.max_tensors} tensors", field=key)
    tensors, offset, names, text = [], 0, set(), 0
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ProtocolError(f"{where} must be an object", field=where)
        name, datatype = item.get("name"), item.get("datatype")
        if not isinstance(name, str) or not name or name in names:
            raise ProtocolError(f"{where}.name must be a unique non-empty string", field=where)
        names.add(name)
        where = f"{key}[{name!r}]"[:200]
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise ProtocolError(f"{where}.datatype {str(datatype)[:32]!r} is not a known datatype", field=where)
        shape, count = _shape(item, where, limits)
        if datatype == "BYTES":
            text += count
            if text > limits.max_bytes_elements:
                raise ProtocolError(f"{where}: more than {limits.max_bytes_elements} BYTES elements in one message "
                                    f"({text} so far)", field=where)
        if expect is not None:
            expect(name, datatype, shape)
        params = _parameters(item.get("parameters"), INPUT_PARAMETERS, f"{where}.parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(raw):
                raise ProtocolError(f"{where}.binary_data_size {size} overruns the binary body", field=where)
            array = from_binary(raw[offset : offset + size], datatype, count, where, limits.max_bytes_element)
            offset += size
        elif "data" in item:
            array = from_json(item["data"], datatype, shape, count, where, nulls)
        else:
            raise ProtocolError(f"{where} has neither data nor binary_data_size", field=where)
        tensors.append(Tensor(name, array.reshape(shape)))
    if offset != len(raw):
        raise ProtocolError(
            f"{len(raw) - offset} bytes of binary data follow the last tensor",
            field="Inference-Header-Content-Length",
        )
    return tensors


def _requested_outputs(items: Any, limits: DecodeLimits) -> list[RequestedOutput]:
    """The outputs a request asks for: each named once, no more of them than tensors a message may hold
    (a request that names one output a million times would otherwise get a million copies back)."""
    if items is None:
        return []
    if not isinstance(items, list) or len(items) > limits.max_tensors:
        raise ProtocolError(f"'outputs' must be a list of at most {limits.max_tensors} outputs", field="outputs")
    out, names = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"outputs[{i}] must be an object with a name", field=f"outputs[{i}]")
        if item["name"] in names:
            raise ProtocolError(f"outputs[{i}] asks for {item['name'][:64]!r} again: name each output once",
                                field=f"outputs[{i}]")
        names.add(item["name"])
        params = _parameters(item.get("parameters"), OUTPUT_PARAMETERS, f"outputs[{i}].parameters")
        binary = params.get("binary_data")
        out.append(RequestedOutput(item["name"], None if binary is None else bool(binary)))
    return out


def decode_infer_request(
    body: bytes, header_length: int | None, limits: DecodeLimits = DecodeLimits(), expect: Expect | None = None
) -> InferRequest:
    """Decode an inference request in JSON or with the binary tensor extension; ``expect`` (the
    model's signature) sees each input's name, datatype and shape before its data is decoded."""
    doc, raw = _split(body, header_length)
    params = _parameters(doc.get("parameters"), REQUEST_PARAMETERS, "parameters")
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 256):
        raise ProtocolError("'id' must be a string of at most 256 characters", field="id")
    unknown = sorted(set(doc) - {"id", "inputs", "outputs", "parameters"})
    if unknown:
        raise ProtocolError(f"unknown field {unknown[0][:64]!r} in the inference request", field=unknown[0][:64])
    return InferRequest(
        inputs=_tensors(doc.get("inputs"), raw, "inputs", limits, expect),
        outputs=_requested_outputs(doc.get("outputs"), limits),
        id=request_id,
        parameters=params,
    )


def _bytes_payload(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _json_data(array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    if flat.dtype.kind in TEXT_KINDS:
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat]
    if flat.dtype == np.float16:
        flat = flat.astype(np.float32)
    return np.ascontiguousarray(flat)


Chunk = bytes | memoryview


def _raw(array: np.ndarray) -> Chunk:
    if array.dtype.kind in TEXT_KINDS:
        return _bytes_payload(array)
    if not array.size:  # a view with a zero in its shape cannot be cast to bytes
        return b""
    contiguous: Any = np.ascontiguousarray(array)
    return memoryview(contiguous).cast("B")  # a view, not a copy


def _encode(
    key: str, tensors: list[Tensor], binary: set[str], top: dict[str, Any], align: int = 1
) -> tuple[list[Chunk], int | None]:
    items, chunks = [], []
    for t in tensors:
        item: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.array.shape)}
        if t.name in binary:
            payload = _raw(t.array)
            item["parameters"] = {"binary_data_size": len(payload)}
            chunks.append(payload)
        else:
            item["data"] = _json_data(t.array)
        items.append(item)
    header = orjson.dumps({**top, key: items}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return [header], None
    # Trailing JSON whitespace keeps the tensor bytes aligned for the receiver's numpy views.
    header += b" " * (-len(header) % align)
    return [header, *chunks], len(header)


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: list[Tensor],
    binary: set[str],
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Encode a response; returns the body and, if any output is binary, the header length."""
    top: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        top["id"] = request_id
    parts, header_length = _encode("outputs", outputs, binary, top)
    return b"".join(parts), header_length


def encode_infer_request(
    inputs: list[Tensor],
    outputs: list[RequestedOutput] | None = None,
    binary: bool = True,
    parameters: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """A client's inference request: binary tensors by default, JSON with ``binary=False``."""
    top: dict[str, Any] = {}
    if request_id is not None:
        top["id"] = request_id
    params = dict(parameters or {})
    if binary:
        params.setdefault("binary_data_output", True)
    if params:
        top["parameters"] = params
    if outputs:
        top["outputs"] = [{"name": o.name, **({"parameters": {"binary_data": o.binary}} if o.binary is not None else {})}
                          for o in outputs]
    parts, header_length = _encode("inputs", inputs, {t.name for t in inputs} if binary else set(), top)
    return b"".join(parts), header_length


def decode_infer_response(body: bytes, header_length: int | None,
                          limits: DecodeLimits = DecodeLimits()) -> tuple[dict[str, Any], list[Tensor]]:
    """A response's JSON document (model name, version, id) and its output tensors (a ``null`` in a
    floating-point JSON tensor, a non-finite value JSON cannot carry, read as NaN)."""
    doc, raw = _split(body, header_length)
    return doc, _tensors(doc.get("outputs"), raw, "outputs", limits, nulls=True)


def encode_tensor_parts(key: str, tensors: list[Tensor]) -> tuple[list[Chunk], int]:
    """All-binary message between the gateway and a worker (``key`` is inputs or outputs), as
    parts to write in sequence: a JSON header padded to 8 bytes, then views of the tensors."""
    parts, header_length = _encode(key, tensors, {t.name for t in tensors}, {}, align=8)
    return parts, header_length if header_length is not None else len(parts[0])


def encode_tensor_message(key: str, tensors: list[Tensor]) -> tuple[bytes, int]:
    """``encode_tensor_parts`` joined into one body."""
    parts, header_length = encode_tensor_parts(key, tensors)
    return b"".join(parts), header_length


def decode_tensor_message(
    body: bytes, header_length: int, key: str, limits: DecodeLimits = DecodeLimits()
) -> list[Tensor]:
    doc, raw = _split(body, header_length)
    return _tensors(doc.get(key), raw, key, limits)

