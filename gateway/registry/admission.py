"""Admission: checks an ONNX file must pass before any ONNX Runtime session sees it.

The model is parsed with the ``onnx`` package (never onnxruntime) and refused, with the reason,
when it:

* is larger than ``max_model_bytes`` or is not a valid ONNX protobuf;
* refers to external data: the gateway hands every model to its worker as bytes, and ONNX
  Runtime would then look for the data file in the worker's working directory. (Given the
  model's folder, ``admit`` also names the more specific reason: an absolute path, ``..``
  anywhere, or a symbolic link that leaves the folder; CVE-2022-25882, CVE-2024-27318,
  CVE-2024-5187.)
* uses an operator domain outside ``allowed_domains`` (custom operators run native code);
* has more than ``max_nodes`` nodes or an initializer larger than ``max_initializer_bytes``;
* declares a default-domain opset outside ``opset_min``..``opset_max``;
* (given its manifest) takes or answers other tensors than the manifest declares: other names, a
  datatype, a rank, or a fixed dimension of its own where the manifest says another. The manifest
  is what requests are checked against before the model sees them; a manifest that disagrees with
  the model would let every request through its checks and fail in ONNX Runtime, or advertise
  outputs the model never answers. A manifest that declares ``"batch": true`` must have a graph
  whose every input and output opens its first dimension under one name: the gateway bounds and
  checks a worker's answer by the request's rows on that promise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from gateway.config import SupplyConfig
from gateway.registry.manifest import Manifest, TensorSpec
from gateway_client.protocol.datatypes import datatype_of

__all__ = ["AdmissionError", "AdmissionReport", "admit"]

DEFAULT_DOMAINS = ("", "ai.onnx")


class AdmissionError(ValueError):
    """A model file refused before reaching ONNX Runtime; the message says why."""


@dataclass(frozen=True)
class AdmissionReport:
    nodes: int
    initializer_bytes: int
    opset: int
    domains: tuple[str, ...]


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    entries = {str(e.key): str(e.value) for e in tensor.external_data}
    return entries.get("location", "")


def _confined(location: str, folder: Path | None) -> str | None:
    """Why ``location`` may not be used, or None when it stays inside ``folder``."""
    if folder is None:
        return ("external data cannot be used: every model is served from memory (its bytes are handed to "
                "the worker, where ONNX Runtime would look for the file in the worker's working directory)")
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
        return f"external data path {location!r} is absolute or empty"
    parts = Path(location).parts
    if ".." in parts or any(".." in p.split("\\") for p in parts):
        return f"external data path {location!r} climbs out of the model's folder"
    target = folder / location
    if target.is_symlink() or any(parent.is_symlink() for parent in target.parents if parent != folder.parent):
        resolved = target.resolve()
        if folder.resolve() not in resolved.parents:
            return f"external data {location!r} is a symbolic link out of the model's folder"
    return None


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    return count * itemsize


def _datatype(elem_type: int) -> str:
    """The Open Inference Protocol datatype of an ONNX element type (ONNX's own name where none is)."""
    try:
        return datatype_of(np.empty(0, onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return str(onnx.TensorProto.DataType.Name(elem_type))


def _disagreement(kind: str, declared: tuple[TensorSpec, ...], graph: list[onnx.ValueInfoProto]) -> str | None:
    """How the manifest's ``declared`` tensors differ from the graph's, or None."""
    actual = {v.name: v for v in graph}
    names = {s.name for s in declared}
    if names != set(actual):
        return (f"the manifest declares {kind} {sorted(names)}, the model's graph has {sorted(actual)}")
    for spec in declared:
        value = actual[spec.name].type
        if not value.HasField("tensor_type"):
            return f"{kind[:-1]} {spec.name!r} is not a tensor in the model"
        datatype = _datatype(value.tensor_type.elem_type)
        if datatype != spec.datatype:
            return f"{kind[:-1]} {spec.name!r} is {spec.datatype} in the manifest, {datatype} in the model"
        if not value.tensor_type.HasField("shape"):
            continue  # the model leaves the shape open: the manifest's stands
        dims = value.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            return f"{kind[:-1]} {spec.name!r} has rank {len(spec.shape)} in the manifest, {len(dims)} in the model"
        for i, (dim, want) in enumerate(zip(dims, spec.shape)):
            if dim.HasField("dim_value") and dim.dim_value > 0 and want != dim.dim_value:
                return (f"{kind[:-1]} {spec.name!r} dimension {i} is {want} in the manifest, "
                        f"{dim.dim_value} in the model")
    return None


def _not_batched(tensors: list[onnx.ValueInfoProto]) -> str | None:
    """Why the graph's inputs and outputs do not share their first dimension, or None."""
    names = {}
    for value in tensors:
        dims = value.type.tensor_type.shape.dim
        names[value.name] = dims[0].dim_param if dims and dims[0].HasField("dim_param") else ""
    if all(names.values()) and len(set(names.values())) == 1:
        return None
    described = ", ".join(f"{name!r}: {param or 'none'}" for name, param in names.items())
    return f"batch is true, but the graph's first dimensions are not one named dimension ({described})"


def admit(data: bytes, config: SupplyConfig, folder: Path | None = None,
          manifest: Manifest | None = None) -> AdmissionReport:
    """Refuse ``data`` (an ONNX model) with ``AdmissionError`` unless it passes every check (and,
    given its ``manifest``, takes and answers what that declares)."""
    if len(data) > config.max_model_bytes:
        raise AdmissionError(f"the model is {len(data)} bytes, more than max_model_bytes ({config.max_model_bytes})")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise AdmissionError(f"not a valid ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not model.HasField("graph"):
        raise AdmissionError("not a valid ONNX model (no graph)")
    graphs = [model.graph]
    nodes, domains = 0, set()
    initializer_bytes = 0
    while graphs:  # subgraphs (If, Loop, Scan) count too
        graph = graphs.pop()
        for tensor in graph.initializer:
            location = _external_location(tensor)
            if location is not None:
                why = _confined(location, folder)
                if why:
                    raise AdmissionError(f"initializer {tensor.name!r}: {why}")
            size = _tensor_bytes(tensor)
            if size > config.max_initializer_bytes:
                raise AdmissionError(f"initializer {tensor.name!r} has {size} bytes, more than "
                                     f"max_initializer_bytes ({config.max_initializer_bytes})")
            initializer_bytes += size
        for node in graph.node:
            nodes += 1
            domains.add(node.domain)
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
                if attribute.HasField("t") and _external_location(attribute.t) is not None:
                    raise AdmissionError(f"node {node.name!r}: attribute tensors may not use external data")
    if nodes > config.max_nodes:
        raise AdmissionError(f"the graph has {nodes} nodes, more than max_nodes ({config.max_nodes})")
    allowed = set(config.allowed_domains) | set(DEFAULT_DOMAINS)
    foreign = sorted(d for d in domains | {o.domain for o in model.opset_import} if d not in allowed)
    if foreign:
        raise AdmissionError(f"operator domain {foreign[0]!r} is not allowed (custom operators run native code); "
                             f"allowed: {sorted(allowed)}")
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    if not config.opset_min <= opset <= config.opset_max:
        raise AdmissionError(f"opset {opset} is outside the supported {config.opset_min}..{config.opset_max}")
    if manifest is not None:
        initialized = {t.name for t in model.graph.initializer}  # inputs with a default (IR < 4)
        inputs = [v for v in model.graph.input if v.name not in initialized]
        why = (_disagreement("inputs", manifest.inputs, inputs)
               or _disagreement("outputs", manifest.outputs, list(model.graph.output)))
        if why is None and manifest.batch:
            why = _not_batched([*inputs, *model.graph.output])
        if why:
            raise AdmissionError(f"the manifest does not describe this model: {why}")
    return AdmissionReport(nodes, initializer_bytes, opset, tuple(sorted(domains)))
