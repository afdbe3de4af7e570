"""Open Inference Protocol v2 over REST: health, metadata, readiness and inference.

https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
Inference runs the model-aware stage list (``gateway.stages``); the other handlers resolve and
authorize the model with the same function and answer from the model table and the worker pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway import __version__
from gateway.access import authorize, principal_of
from gateway.catalog import ModelTable
from gateway.context import get_context
from gateway.errors import Unavailable
from gateway.events import EventSink
from gateway.guards.stages import GuardHealth
from gateway.guards.watching import WatchStore
from gateway.security.incidents import IncidentStore
from gateway.security.ratelimit import Limiter
from gateway.security.rbac import Policy
from gateway.stages import InferCall, Stage, resolve_model, run_stages
from gateway.workers.pool import WorkerPool

__all__ = ["PLATFORM", "V2"]

PLATFORM = "onnxruntime_onnx"


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class V2:
    """The protocol's handlers over the model table, the worker pool and the inference stages."""

    def __init__(self, models: ModelTable, pool: WorkerPool, policy: Policy, limiter: Limiter,
                 stages: Sequence[Stage], health: GuardHealth | None = None, events: EventSink | None = None,
                 explain_stages: Sequence[Stage] = (), watches: WatchStore | None = None,
                 incidents: IncidentStore | None = None, ready_when: str = "all") -> None:
        self.ready_when = ready_when
        self.explain_stages = explain_stages
        self.watches = watches
        self.incidents = incidents
        self.health = health or GuardHealth()
        self.events = events
        self.models = models
        self.pool = pool
        self.policy = policy
        self.limiter = limiter
        self.stages = stages

    async def infer(self, request: Request) -> Response:
        return await self._run(self.stages, request)

    async def explain(self, request: Request) -> Response:
        """``POST .../explain``: attributions for one input (``gateway.stages.explain``)."""
        return await self._run(self.explain_stages, request)

    @staticmethod
    async def _run(stages: Sequence[Stage], request: Request) -> Response:
        call = InferCall(get_context(request.scope), request.headers, request.path_params, request.receive)
        await run_stages(stages, call)
        assert call.answer is not None, "the last stage makes the answer"
        answer = call.answer
        return Response(answer.body, media_type=answer.media_type, headers=answer.headers)

    async def model_index(self, request: Request) -> Response:
        """``GET /v2/models``: the models this caller may use (others are not even named)."""
        principal = authorize(get_context(request.scope), self.policy, "list")
        names = self.policy.visible_models(principal, self.models.names())
        return _json({"models": [
            {"name": n, "versions": self.models.versions(n), "platform": PLATFORM, "ready": self.pool.ready(n)}
            for n in names
        ]})

    async def repository_index(self, request: Request) -> Response:
        """``POST /v2/repository/index`` (Triton's repository extension, as ``tritonclient`` calls it)."""
        principal = authorize(get_context(request.scope), self.policy, "list")
        names = self.policy.visible_models(principal, self.models.names())
        return _json([
            {"name": n, "version": e.manifest.version, "state": "READY" if self.pool.ready(e.unit.key) else "UNAVAILABLE"}
            for n in names for e in self.models.of(n)
        ])

    async def admin_models(self, request: Request) -> Response:
        """``GET /admin/models``: the operator's view, with configuration and execution providers."""
        principal = authorize(get_context(request.scope), self.policy, "admin:models")
        entries = [e for n in self.models.names() for e in self.models.of(n)
                   if self.policy.decide(principal, "admin:models", n).allowed]
        return _json({"models": [
            {"name": e.unit.model, "version": e.manifest.version, "default": e.unit.default,
             "sha256": e.manifest.sha256, "ready": self.pool.ready(e.unit.key),
             "execution_providers": self.pool.providers(e.unit.key), "config": dataclasses.asdict(e.config),
             "guard": None if e.guard is None else {"detectors": list(e.guard.detectors), "threshold": e.guard.threshold,
                                                    "target_fpr": e.guard.config.target_fpr,
                                                    "calibration_data_sha256": e.guard.calibration.data_sha256}}
            for e in entries
        ]})

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        if not self.pool.is_ready(self.ready_when):
            raise Unavailable("not every model has a healthy worker yet" if self.ready_when == "all"
                              else "no model has a healthy worker yet", retry_after=1)
        body: dict[str, Any] = {"ready": True}
        degraded = self.degraded()
        if waiting := self.pool.not_ready():  # ready_when = "any": the others still serve
            degraded["models"] = waiting
        if degraded:
            body["degraded"] = degraded
        return _json(body)

    def degraded(self) -> dict[str, Any]:
        """What serves in a degraded way now, by area (readiness says it, a metric counts it)."""
        degraded: dict[str, Any] = {}
        limits = self.limiter.status()
        if "degraded" in limits:
            degraded["limits"] = limits["degraded"]  # still serving, with per-process limits
        guards = self.health.degraded()
        if guards:
            degraded["guard"] = guards  # detectors failed lately: on_error applied
        if self.incidents is not None and self.incidents.degraded:
            degraded["incidents"] = f"incident-control storage unreachable, the controls in force stay: {self.incidents.degraded}"
        if self.watches is not None and self.watches.degraded:
            degraded["extraction"] = f"monitor storage unreachable, watching per process: {self.watches.degraded}"
        if self.events is not None and self.events.enabled and self.events.last_error:
            degraded["events"] = f"webhook delivery failing: {self.events.last_error}"
        return degraded

    async def server_metadata(self, request: Request) -> Response:
        principal_of(get_context(request.scope))
        return _json({"name": "gateway", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_metadata(self, request: Request) -> Response:
        entry = resolve_model(get_context(request.scope), request.path_params, self.models, self.policy, "metadata")
        m = entry.manifest
        return _json({
            "name": m.name,
            "versions": [m.version] if "version" in request.path_params else self.models.versions(m.name),
            "platform": PLATFORM,
            "inputs": [s.metadata() for s in m.inputs],
            "outputs": [s.metadata() for s in m.outputs],
            "parameters": {"execution_providers": self.pool.providers(entry.unit.key)},
        })

    async def model_ready(self, request: Request) -> Response:
        entry = resolve_model(get_context(request.scope), request.path_params, self.models, self.policy, "metadata",
                              self.incidents)  # a quarantined version is not ready
        m, key = entry.manifest, entry.unit.key
        if not self.pool.ready(key):
            raise Unavailable(f"model {m.name!r} version {m.version!r} has no healthy worker", retry_after=1)
        parameters: dict[str, Any] = {"execution_providers": self.pool.providers(key)}
        remote = [w for w in self.pool.workers.get(key, ()) if w.endpoint]
        if remote:  # each worker host: in rotation or not, and whether it runs this version's model
            parameters["endpoints"] = [{"endpoint": w.endpoint, "ready": w.healthy, "version": w.info.get("version"),
                                        "same_model": w.info.get("model_sha256") == m.sha256,
                                        "providers": w.info.get("providers", [])} for w in remote]
        return _json({"name": m.name, "ready": True, "parameters": parameters})
