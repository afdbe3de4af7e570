"""Checks that need the decoded tensors: the model's signature, then the model-level limits."""

from __future__ import annotations

from gateway.access import principal_of
from gateway.registry.signature import check_inputs, check_outputs
from gateway.security.ratelimit import Charge, Limiter
from gateway.stages.base import InferCall, elements, offload

__all__ = ["CheckSignature", "ModelLimits"]


class CheckSignature:
    """Values against the manifest: NaN and Inf, the declared domain, UTF-8, a shared batch size."""

    name = "check-signature"

    async def __call__(self, call: InferCall) -> None:
        assert call.request is not None
        manifest = call.model.manifest
        call.inputs = await offload(elements(call.request.inputs), check_inputs, manifest, call.request.inputs)
        check_outputs(manifest, call.request.outputs)


class ModelLimits:
    """The per-principal-and-model rate limit and the query budgets (inferences and input rows),
    admitted with what the request owes its address and principal: one round trip, which with
    Redis runs while ``Infer`` sends the inputs to the worker (``[limits] admission``)."""

    name = "model-limits"

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def __call__(self, call: InferCall) -> None:
        key = f"{principal_of(call.ctx).key}|{call.model.unit.model}"
        first = call.inputs[0].array if call.inputs else None
        rows = int(first.shape[0]) if first is not None and first.ndim else 1
        limiter = self.limiter
        charges = call.ctx.take_charges(Charge(limiter.per_principal_model, key), Charge(limiter.budget_inferences, key),
                                        Charge(limiter.budget_rows, key, max(1, rows)))
        if limiter.concurrent:
            call.admission = limiter.admit_soon(charges)
        else:
            await limiter.admit(charges)
