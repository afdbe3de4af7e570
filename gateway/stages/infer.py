"""Running the model on a worker, and encoding its answer."""

from __future__ import annotations

import hashlib

import numpy as np

from gateway.context import TensorDigest
from gateway.offload import text_elements
from gateway.registry.signature import answer_bound, check_answer
from gateway.stages.base import Answer, InferCall, elements, offload
from gateway.workers.pool import WorkerPool
from gateway_client.protocol.codec import RequestedOutput, Tensor, encode_infer_response

__all__ = ["Encode", "Infer", "tensor_digest"]


def tensor_digest(tensor: Tensor) -> TensorDigest:
    """A tensor's description, size and SHA-256 (of its bytes; for BYTES, of its length-prefixed
    elements, as the binary extension sends them)."""
    array = tensor.array
    h = hashlib.sha256()
    if array.dtype == object:
        size = 0
        for element in array.reshape(-1):
            h.update(len(element).to_bytes(4, "little"))
            h.update(element)
            size += 4 + len(element)
    else:
        data = np.ascontiguousarray(array)
        if data.size:  # a view with a zero in its shape cannot be cast to bytes; it has none to hash
            h.update(data.data.cast("B"))
        size = data.nbytes
    return TensorDigest(tensor.name, tensor.datatype, tuple(array.shape), size, h.hexdigest())


def _digests(tensors: list[Tensor]) -> list[TensorDigest]:
    return [tensor_digest(t) for t in tensors]


class Infer:
    """The checked inputs to the least-loaded healthy worker of the unit; their digests, the
    worker's name and the outputs' digests into the context."""

    name = "infer"

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def __call__(self, call: InferCall) -> None:
        ctx = call.ctx
        ctx.inputs = await offload(elements(call.inputs), _digests, call.inputs)

        def picked(worker: str) -> None:
            ctx.worker = worker

        manifest = call.model.manifest
        admission, call.admission = call.admission, None
        try:
            sent = call.inputs
            if call.riders:
                sent = await offload(elements(call.inputs) + elements(call.riders), _with_riders,
                                     call.inputs, call.riders)
            rows = sent[0].array.shape[0] if manifest.batch else None
            outputs = await self.pool.infer(call.model.unit.key, sent, ctx.deadline, picked,
                                            answer_bound(manifest, rows))
        finally:
            if admission is not None:
                await admission  # refused: its 429, and these outputs are never used
        check_answer(manifest, outputs, rows)
        if not call.riders:
            call.outputs = outputs
        else:
            own = call.inputs[0].array.shape[0]
            call.outputs = [Tensor(t.name, t.array[:own]) for t in outputs]
            call.rider_outputs = [Tensor(t.name, t.array[own:]) for t in outputs]
        ctx.outputs = await offload(elements(call.outputs), _digests, call.outputs)


def _with_riders(inputs: list[Tensor], riders: list[Tensor]) -> list[Tensor]:
    """Each input with its riders' rows after its own (one worker batch)."""
    extra = {t.name: t.array for t in riders}
    return [Tensor(t.name, np.concatenate([t.array, extra[t.name]])) if t.name in extra else t
            for t in inputs]


def _select(outputs: list[Tensor], requested: list[RequestedOutput], binary_default: bool) -> list[tuple[Tensor, bool]]:
    if not requested:
        return [(t, binary_default) for t in outputs]
    by_name = {t.name: t for t in outputs}
    return [(by_name[r.name], binary_default if r.binary is None else r.binary) for r in requested if r.name in by_name]


class Encode:
    """The requested outputs, JSON or binary as asked, into the answer."""

    name = "encode"

    async def __call__(self, call: InferCall) -> None:
        assert call.request is not None
        manifest = call.model.manifest
        selected = _select(call.outputs, call.request.outputs, call.request.binary_output)
        outputs = [t for t, _ in selected]
        payload, header_length = await offload(  # BYTES elements are encoded one by one: many, in a thread
            text_elements(outputs), encode_infer_response, manifest.name, manifest.version, outputs,
            {t.name for t, binary in selected if binary}, call.request.id)
        headers = dict(call.response_headers)
        if header_length is None:
            call.answer = Answer(payload, "application/json", headers or None)
        else:
            headers["Inference-Header-Content-Length"] = str(header_length)
            call.answer = Answer(payload, "application/octet-stream", headers)
