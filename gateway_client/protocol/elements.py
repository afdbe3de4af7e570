"""A tensor's data into an array, bounded by the data actually present.

Binary data: the byte count must match the shape and datatype before anything is made (numbers
are then a view of the body; BOOL bytes must be 0 or 1); BYTES elements need four bytes each at
least, checked before the element array is allocated. JSON data: the list's structure and its
elements' Python types are checked in plain Python, and the values converted straight into the
declared datatype, never through numpy's type inference (a stray string would make numpy build
a fixed-width unicode array as wide as the longest string for every element).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from gateway_client.protocol.datatypes import DATATYPES, JSON_TYPES
from gateway_client.protocol.errors import ProtocolError

__all__ = ["from_binary", "from_json"]


def _bytes_elements(raw: memoryview, count: int, where: str, max_element: int) -> np.ndarray:
    if count * 4 > len(raw):  # each element is at least its 4-byte length: nothing allocated for a lie
        raise ProtocolError(f"{where}: {count} BYTES elements need at least {count * 4} bytes, "
                         f"binary_data_size is {len(raw)}", field=where)
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise ProtocolError(f"{where}: BYTES data ends inside element {i}", field=where)
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if size > max_element or pos + size > len(raw):
            raise ProtocolError(f"{where}: BYTES element {i} has a bad length {size}", field=where)
        out[i] = bytes(raw[pos : pos + size])
        pos += size
    if pos != len(raw):
        raise ProtocolError(f"{where}: {len(raw) - pos} trailing bytes after BYTES elements", field=where)
    return out


def from_binary(raw: memoryview, datatype: str, count: int, where: str, max_element: int) -> np.ndarray:
    """A binary tensor's array: a view of ``raw`` for numbers, elements copied out for BYTES."""
    if datatype == "BYTES":
        return _bytes_elements(raw, count, where, max_element)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(
            f"{where}: binary_data_size is {len(raw)} bytes but shape and datatype need "
            f"{count * dtype.itemsize}",
            field=where,
        )
    if datatype == "BOOL" and len(raw):
        # numpy reads any byte but 0 as true; a model may not (ONNX Runtime's Not answered 2 as true too)
        largest = int(np.frombuffer(raw, dtype=np.uint8).max())
        if largest > 1:
            raise ProtocolError(f"{where}: BOOL elements must be bytes 0 or 1, found {largest}", field=where)
    return np.frombuffer(raw, dtype=dtype)


def _leaf_lists(data: list[Any], shape: tuple[int, ...], where: str) -> list[list[Any]]:
    """The innermost lists of ``data``, which must be nested exactly as ``shape`` (at any depth, a
    list of lists of the declared length, down to lists of values)."""
    level = [data]
    for depth, dim in enumerate(shape[:-1]):
        below: list[list[Any]] = []
        for node in level:
            if len(node) != dim or not all(type(x) is list for x in node):
                raise ProtocolError(f"{where}.data is not nested as its shape {list(shape)} (at depth {depth})",
                                 field=where)
            below.extend(node)
        level = below
    if shape and any(len(node) != shape[-1] for node in level):
        raise ProtocolError(f"{where}.data is not nested as its shape {list(shape)}", field=where)
    return level


def from_json(data: Any, datatype: str, shape: tuple[int, ...], count: int, where: str,
              nulls: bool = False) -> np.ndarray:
    """A JSON ``data`` list's array, in ``datatype``: flat, or nested exactly as ``shape``. With
    ``nulls`` (an answer, never a request), ``null`` is read as NaN in a floating-point tensor: JSON
    has no NaN or infinity, and a server writes a model's non-finite outputs as ``null``."""
    if not isinstance(data, list):
        raise ProtocolError(f"{where}.data must be a list", field=where)
    found = set(map(type, data))
    if list in found:  # nested: exactly as the shape says
        leaves = _leaf_lists(data, shape, where)
        found = set()
        for leaf in leaves:
            found.update(map(type, leaf))
    else:  # flat: one value per element
        if len(data) != count:
            raise ProtocolError(f"{where}.data has {len(data)} elements but its shape needs {count}", field=where)
        leaves = [data]
    allowed = JSON_TYPES[datatype] | ({type(None)} if nulls and DATATYPES[datatype].kind == "f" else set())
    if not found <= allowed:
        kinds = ", ".join(sorted(t.__name__ for t in found - allowed))
        raise ProtocolError(f"{where}.data holds {kinds} values, not {datatype}", field=where)
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = [s.encode() for leaf in leaves for s in leaf]
        return out
    try:
        with np.errstate(over="ignore"):  # an infinity is refused by the signature check, not here
            return np.array(data, dtype=DATATYPES[datatype]).reshape(-1)
    except OverflowError:
        raise ProtocolError(f"{where}.data has values outside {datatype}'s range", field=where) from None
