"""Open Inference Protocol tensor datatypes and their numpy equivalents.

https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md#tensor-data-types
"""

from __future__ import annotations

import numpy as np

__all__ = ["DATATYPES", "FLOATS", "JSON_TYPES", "TEXT_KINDS", "datatype_of", "numpy_dtype"]

# BYTES is a variable-length type held in object arrays of ``bytes``.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

_BY_DTYPE = {dt: name for name, dt in DATATYPES.items() if name != "BYTES"}
FLOATS = frozenset(name for name, dt in DATATYPES.items() if dt.kind == "f")
"""The floating-point datatypes: FP16, FP32, FP64."""

# Which Python types (as a JSON parser makes them) a ``data`` list may hold for each datatype:
# numbers for numeric types (whole numbers only for integer types), booleans for BOOL, strings for
# BYTES. Strings never pass for numbers (numpy would silently parse "1.0"), nor booleans for numbers.
JSON_TYPES: dict[str, frozenset[type]] = {
    name: frozenset({int, float}) if dt.kind == "f" else frozenset({int}) for name, dt in DATATYPES.items()
}
JSON_TYPES["BOOL"] = frozenset({bool})
JSON_TYPES["BYTES"] = frozenset({str})


def numpy_dtype(datatype: str) -> np.dtype:
    return DATATYPES[datatype]


TEXT_KINDS = "OSU"
"""numpy kinds sent as BYTES: object arrays (of bytes or str) and fixed-width bytes or str arrays."""


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in TEXT_KINDS:
        return "BYTES"
    try:
        return _BY_DTYPE[array.dtype]
    except KeyError:
        raise ValueError(f"no Open Inference Protocol datatype for numpy {array.dtype}") from None
