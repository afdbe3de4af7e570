"""Checks of decoded tensors against a model's declared signature (its manifest).

Runs in the gateway before a worker sees a byte. ``expect`` checks a tensor's name, datatype,
rank and fixed dimensions from its description alone, before the decoder reads its data (so a
``BYTES`` tensor sent to a model that takes none is refused before anything is allocated);
``check_inputs`` then checks the decoded tensors: the same again, a shared batch dimension, NaN
and Inf, the declared value domain (refused, or clipped where the manifest's ``domain.policy`` is
``"clip"``), and UTF-8 for text BYTES. Failures are ``InvalidInput`` (422) naming the offending input.

A worker's answer is checked after (``check_answer``), and for a model whose manifest declares
``"batch": true`` bounded before it is read (``answer_bound``): a compromised worker can neither
answer rows nobody asked for nor make the gateway buffer more than the request's rows can fill.
"""

from __future__ import annotations

import math

import numpy as np

from gateway.errors import BadModelAnswer, InvalidInput
from gateway.registry.manifest import Manifest, TensorSpec
from gateway_client.protocol.codec import RequestedOutput, Tensor
from gateway_client.protocol.datatypes import numpy_dtype

__all__ = ["ANSWER_HEAD_BYTES", "Signature", "answer_bound", "check_answer", "check_inputs", "check_outputs"]

ANSWER_HEAD_BYTES = 64 * 1024
"""What an answer's tensor-message header (its JSON: names, datatypes, shapes) may add to its data."""


def _check_declared(datatype: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    if datatype != spec.datatype:
        where = f"inputs[{spec.name!r}]"
        raise InvalidInput(f"{where}: datatype {datatype}, the model expects {spec.datatype}", field=where)
    if len(shape) != len(spec.shape) or any(want != -1 and got != want for got, want in zip(shape, spec.shape)):
        where = f"inputs[{spec.name!r}]"
        raise InvalidInput(f"{where}: shape {list(shape)} does not match the model's {list(spec.shape)}",
                           field=where)


class Signature:
    """A model's inputs, as the decoder's ``expect`` callback (picklable: decoders may run elsewhere)."""

    def __init__(self, inputs: tuple[TensorSpec, ...], model: str) -> None:
        self.inputs = {s.name: s for s in inputs}
        self.model = model

    def expect(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        spec = self.inputs.get(name)
        if spec is None:
            raise InvalidInput(f"unknown input {name[:64]!r} for model {self.model}", field="inputs")
        _check_declared(datatype, shape, spec)


def _check_one(tensor: Tensor, spec: TensorSpec) -> Tensor:
    array = tensor.array
    _check_declared(tensor.datatype, array.shape, spec)
    where = f"inputs[{spec.name!r}]"
    if array.dtype == object:
        if spec.text:
            for i, element in enumerate(array.reshape(-1)):
                try:
                    element.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInput(f"{where}: element {i} is not valid UTF-8", field=where) from None
        return tensor
    if array.dtype.kind == "f" and array.size:
        # min/max are NaN if any element is, and propagate infinities: one pass each.
        lo, hi = float(array.min()), float(array.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InvalidInput(f"{where}: NaN or infinite values are not accepted", field=where)
    elif array.size and array.dtype.kind in "iu":
        lo, hi = float(array.min()), float(array.max())
    else:
        return tensor
    if (spec.min is not None and lo < spec.min) or (spec.max is not None and hi > spec.max):
        if spec.clip:
            return Tensor(tensor.name, np.clip(array, spec.min, spec.max).astype(array.dtype, copy=False))
        raise InvalidInput(
            f"{where}: values span [{lo:g}, {hi:g}], outside the model's domain "
            f"[{spec.min}, {spec.max}]",
            field=where,
        )
    return tensor


def check_inputs(manifest: Manifest, inputs: list[Tensor]) -> list[Tensor]:
    """The inputs in the model's order, checked (and clipped where its domain policy says so)."""
    given = {t.name: t for t in inputs}
    unknown = sorted(set(given) - {s.name for s in manifest.inputs})
    if unknown:
        raise InvalidInput(f"unknown input {unknown[0][:64]!r} for model {manifest.name}", field="inputs")
    batch: set[int] = set()
    checked = []
    for spec in manifest.inputs:
        tensor = given.get(spec.name)
        if tensor is None:
            raise InvalidInput(f"missing input {spec.name!r}", field=f"inputs[{spec.name!r}]")
        checked.append(_check_one(tensor, spec))
        if spec.shape and spec.shape[0] == -1:
            batch.add(tensor.array.shape[0])
    if len(batch) > 1:
        raise InvalidInput(f"inputs disagree on the batch size: {sorted(batch)}", field="inputs")
    if batch == {0}:
        raise InvalidInput("the batch is empty", field="inputs")
    return checked


def answer_bound(manifest: Manifest, rows: int | None) -> int | None:
    """The most bytes a worker's answer to ``rows`` input rows can hold (its tensor message), or
    None where the manifest does not bound it: a model without ``"batch": true``, or one with a
    BYTES output or an open dimension past the first."""
    if not manifest.batch or rows is None:
        return None
    total = ANSWER_HEAD_BYTES
    for spec in manifest.outputs:
        if spec.datatype == "BYTES" or -1 in spec.shape[1:]:
            return None
        total += rows * math.prod(spec.shape[1:]) * numpy_dtype(spec.datatype).itemsize
    return total


def check_answer(manifest: Manifest, outputs: list[Tensor], rows: int | None = None) -> None:
    """A worker's outputs against the model's declared ones: names, datatypes, ranks and fixed
    dimensions, and for a model declared ``"batch"`` one row per input row (``rows``). The worker
    is not trusted further than that (``BadModelAnswer``, 502)."""
    declared = {s.name: s for s in manifest.outputs}
    for t in outputs:
        spec = declared.get(t.name)
        shape = t.array.shape
        if spec is None:
            raise BadModelAnswer(f"{manifest.name} answered an output it does not declare ({t.name[:64]!r})")
        if (t.datatype != spec.datatype or len(shape) != len(spec.shape)
                or any(want != -1 and got != want for got, want in zip(shape, spec.shape))):
            raise BadModelAnswer(f"{manifest.name} answered {spec.name} as {t.datatype} {list(shape)}; its manifest "
                                 f"declares {spec.datatype} {list(spec.shape)}")
        if manifest.batch and rows is not None and shape[0] != rows:
            raise BadModelAnswer(f"{manifest.name} answered {shape[0]} rows of {spec.name} to {rows} input rows; its "
                                 "manifest declares one row per input row")


def check_outputs(manifest: Manifest, outputs: list[RequestedOutput]) -> None:
    known = {s.name for s in manifest.outputs}
    for out in outputs:
        if out.name not in known:
            raise InvalidInput(f"unknown output {out.name!r} for model {manifest.name}", field="outputs")
