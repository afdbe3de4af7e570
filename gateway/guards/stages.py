"""The guard: detectors on the request path, in two stages around ``Infer``.

``GuardInputs`` (the guard position, before the limits and the model) computes the input's
squeezed copies, which ride in the same worker batch as the input (``InferCall.riders``: one round
trip). ``GuardVerdict`` (right after ``Infer``) scores every row with each enabled detector, puts
the scores in the context, combines them against the calibrated threshold and acts: ``record``,
``flag`` (a ``Gateway-Finding`` response header), ``reject`` (422 ``adversarial-input``, nothing
of the output returned) or ``throttle`` (the request counts ``throttle_cost`` times against the
principal's budgets), chosen per model and per role. A detector that fails or runs past
``timeout_ms`` falls back to ``on_error`` and is counted and reported by readiness.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from gateway.access import principal_of
from gateway.context import Finding, SecurityEvent
from gateway.errors import GatewayError, Unavailable
from gateway.guards.guard import TECHNIQUES, ModelGuard
from gateway.offload import OFFLOAD_ELEMENTS, offload
from gateway.security.ratelimit import Limiter
from gateway.stages.base import InferCall
from gateway_client.protocol.codec import Tensor

__all__ = ["AdversarialInput", "GuardFailed", "GuardHealth", "GuardInputs", "GuardVerdict", "scores_of"]

log = logging.getLogger("gateway.guard")
FINDING_HEADER = "Gateway-Finding"
RECENT_S = 300.0


class AdversarialInput(GatewayError):
    status = 422
    type = "adversarial-input"
    title = "Input refused by the adversarial-input guard"


class GuardFailed(Unavailable):
    type = "guard-unavailable"
    title = "The input guard could not run"


@dataclass
class GuardHealth:
    """Detector failures, for metrics and readiness."""

    errors: dict[str, int] = field(default_factory=dict)
    last: dict[str, tuple[float, str]] = field(default_factory=dict)

    def failed(self, model: str, why: str) -> None:
        self.errors[model] = self.errors.get(model, 0) + 1
        self.last[model] = (time.monotonic(), why)

    def degraded(self) -> dict[str, str]:
        now = time.monotonic()
        return {m: f"{why} ({self.errors[m]} failures so far)" for m, (at, why) in self.last.items() if now - at < RECENT_S}


def scores_of(call: InferCall, outputs: list[Tensor]) -> np.ndarray:
    """The model's scores output (``Manifest.scores``) among ``outputs``: what the guard and the
    extraction monitor judge, and what their calibration was made on."""
    spec = call.model.manifest.scores
    for t in outputs:
        if spec is not None and t.name == spec.name:
            return t.array
    raise LookupError(f"no scores output ({spec.name if spec else 'none declared'}) among {[t.name for t in outputs]}")


class GuardInputs:
    """The squeezed copies of the checked input, to ride in the same worker batch."""

    name = "guard-inputs"

    def __init__(self, health: GuardHealth) -> None:
        self.health = health

    async def __call__(self, call: InferCall) -> None:
        guard = call.model.guard
        if guard is None or not guard.squeezers:
            return
        tensor = call.inputs[0]
        try:
            riders = await offload(tensor.array.size * len(guard.squeezers), guard.riders, tensor.array)
        except Exception as exc:  # a detector's failure is never the request's 500
            _failed(call, self.health, guard, exc)
            return
        if riders is not None:
            call.riders = [Tensor(tensor.name, riders.astype(tensor.array.dtype, copy=False))]


class GuardVerdict:
    """Scores into the context; a detection is recorded, flagged, throttled or refused."""

    name = "guard-verdict"

    def __init__(self, health: GuardHealth, limiter: Limiter) -> None:
        self.health = health
        self.limiter = limiter

    async def __call__(self, call: InferCall) -> None:
        guard = call.model.guard
        if guard is None or call.ctx.error is not None:
            return
        if guard.squeezers and not call.rider_outputs:
            return  # GuardInputs failed and said so
        x = call.inputs[0].array
        work = x.size * (2 + len(guard.squeezers))
        try:
            scores = scores_of(call, call.outputs)
            rider = scores_of(call, call.rider_outputs) if call.rider_outputs else None
            if work <= OFFLOAD_ELEMENTS:  # microseconds, on the event loop: nothing to time out
                verdict = guard.verdict(x, scores, rider)
            else:
                verdict = await asyncio.wait_for(offload(work, guard.verdict, x, scores, rider),
                                                 guard.config.timeout_ms / 1000)
        except TimeoutError:
            _failed(call, self.health, guard, TimeoutError(f"the detectors ran past {guard.config.timeout_ms:g} ms"))
            return
        except Exception as exc:
            _failed(call, self.health, guard, exc)
            return
        ctx = call.ctx
        ctx.scores = {**verdict.scores, "combined": verdict.combined}
        if not verdict.fired:
            return
        principal = principal_of(ctx)
        action = guard.config.action_for(principal.roles)
        technique = TECHNIQUES[verdict.detector]
        detail = (f"{verdict.detector} score places the input beyond the calibrated threshold "
                  f"(combined {verdict.combined:.3f} > {verdict.threshold:.3f})")
        ctx.findings.append(Finding("guard", "adversarial-input", detail, action, technique, verdict.combined))
        ctx.events.append(SecurityEvent(
            principal=principal.key, model=guard.manifest.name, version=guard.manifest.version,
            detector=verdict.detector, score=verdict.combined, threshold=verdict.threshold, action=action,
            technique=technique, request_id=ctx.request_id, scores=verdict.scores))
        # The caller learns that a detection happened and its class, never which detector or by how
        # much: a score would be an oracle to optimize an evasion against (the audit record has both).
        if action == "flag":
            call.response_headers[FINDING_HEADER] = f'adversarial-input; technique="{technique}"'
        elif action == "reject":
            raise AdversarialInput(f"the input was refused as adversarial or anomalous ({technique})",
                                   technique=technique)
        elif action == "throttle":
            key = f"{principal.key}|{call.model.unit.model}"
            cost = guard.config.throttle_cost - 1  # the request itself was counted once already
            await self.limiter.hit(self.limiter.budget_inferences, key, cost=cost)


def _failed(call: InferCall, health: GuardHealth, guard: ModelGuard, exc: BaseException) -> None:
    why = f"{type(exc).__name__}: {exc}"[:300]
    health.failed(guard.manifest.name, why)
    log.warning("guard of %s/%s failed on request %s: %s", guard.manifest.name, guard.manifest.version,
                call.ctx.request_id, why)
    call.riders = []
    call.ctx.findings.append(Finding("guard", "guard-error", why, guard.config.on_error))
    if guard.config.on_error == "reject":
        raise GuardFailed("the input guard could not run, and this model refuses then; quote the request id",
                          retry_after=1)

