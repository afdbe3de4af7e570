"""The application factory: the middleware list and the model-aware stage list, side by side.

Middleware handles what needs no model (outer → inner: audit, problems, context, address limits,
authentication, principal limits); the stages, what needs the model, the decision or the tensors.
The routes come from the route table (``gateway.routes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from gateway import __version__
from gateway.audit.background import AuditBackground
from gateway.audit.chain import load_private_key
from gateway.audit.middleware import AuditMiddleware, ProbeTally
from gateway.audit.writer import AuditWriter
from gateway.catalog import ModelTable
from gateway.config import Config, load_config
from gateway.endpoints import V2, IssuerEndpoints, OpsEndpoints
from gateway.endpoints.incident import IncidentEndpoints
from gateway.errors import GatewayError, MethodNotAllowed, NotFound, bad_request
from gateway.events import EventSink
from gateway.guards.stages import GuardHealth, GuardInputs, GuardVerdict
from gateway.guards.watching import ExtractionGate, ExtractionWatch, WatchStore
from gateway.httpserver import freeze_startup_heap
from gateway.metrics import Metrics
from gateway.middleware import AuthMiddleware, ContextMiddleware, ProblemMiddleware, ProblemResponse
from gateway.middleware.limits import AddressLimitMiddleware, PrincipalLimitMiddleware
from gateway.openapi import openapi_document
from gateway.registry.manifest import Manifest, load_units
from gateway.routes import ROUTES, starlette_routes
from gateway.security.incidents import IncidentStore
from gateway.security.issuer import BuiltinIssuer
from gateway.security.ratelimit import Limiter
from gateway.security.rbac import Policy
from gateway.security.tls import certificate_expiries
from gateway.security.tokens import TokenValidator
from gateway.security.xfcc import TrustedProxies
from gateway.stages import (
    CheckSignature,
    Decode,
    Decoder,
    Encode,
    Infer,
    InFlightBytes,
    ModelLimits,
    ReadBody,
    Resolve,
    Stage,
)
from gateway.stages.explain import Explain
from gateway.stages.outputs import OutputPolicy
from gateway.units import Unit
from gateway.workers.pool import WorkerPool
from gateway_client.protocol.errors import ProtocolError

__all__ = ["app_from_environment", "create_app", "explain_stages", "infer_stages", "middleware_stack"]

log = logging.getLogger("gateway.app")


def middleware_stack(config: Config, writer: AuditWriter | None, metrics: Metrics, probes: ProbeTally,
                     limiter: Limiter, validator: TokenValidator, events: EventSink | None = None,
                     incidents: IncidentStore | None = None) -> list[Middleware]:
    """What needs no model, outer to inner."""
    return [
        Middleware(AuditMiddleware, writer=writer, metrics=metrics, fail_closed=config.audit.fail_closed,
                   known_models=frozenset(m.name for m in config.models), probes=probes if writer else None,
                   events=events),
        Middleware(ProblemMiddleware, debug=config.server.debug),
        Middleware(ContextMiddleware, trusted_proxies=TrustedProxies(config.tls.trusted_proxies, config.tls.xfcc_hops),
                   timeout_s=config.server.request_timeout_s),
        Middleware(AddressLimitMiddleware, limiter=limiter),
        Middleware(AuthMiddleware, validator=validator, auth=config.auth, incidents=incidents),
        Middleware(PrincipalLimitMiddleware, limiter=limiter),
    ]


def infer_stages(
    config: Config, models: ModelTable, policy: Policy, limiter: Limiter, pool: WorkerPool, decoder: Decoder,
    in_flight: InFlightBytes, guards: Sequence[Stage] = (), verdicts: Sequence[Stage] = (),
    output_policies: Sequence[Stage] = (), incidents: IncidentStore | None = None,
) -> list[Stage]:
    """The model-aware path of an inference, in order. A new stage is one class and one line here."""
    return [
        Resolve(models, policy, "infer", incidents),
        ReadBody(config.server.max_body_bytes, in_flight),
        Decode(decoder),
        CheckSignature(),
        *guards,  # the AI-specific monitors (adversarial inputs, anomalies, extraction)
        ModelLimits(limiter),
        Infer(pool),
        *verdicts,  # guards that judge by the model's outputs (on the input and its riders)
        *output_policies,  # what a role may see of the outputs (top-k, rounding, label-only)
        Encode(),
    ]


def explain_stages(config: Config, models: ModelTable, policy: Policy, limiter: Limiter, pool: WorkerPool,
                   decoder: Decoder, in_flight: InFlightBytes, incidents: IncidentStore | None = None,
                   gates: Sequence[Stage] = ()) -> list[Stage]:
    """An explanation: the inference path's checks, then attributions instead of one inference."""
    return [
        Resolve(models, policy, "explain", incidents),
        ReadBody(config.server.max_body_bytes, in_flight),
        Decode(decoder),
        CheckSignature(),
        *gates,  # alarms in force against the caller (model extraction)
        Explain(pool, limiter),
    ]


def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}",
                                 allow=(exc.headers or {}).get("Allow", ""))
    elif exc.status_code == 404:
        error = NotFound("no such route or model")
    else:
        error = GatewayError(exc.detail)
    return ProblemResponse(error, request.scope)


def _gateway_error(debug: bool, request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return ProblemResponse(exc, request.scope, debug)


def _protocol_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProtocolError)
    return ProblemResponse(bad_request(exc), request.scope)


def _audit_writer(config: Config) -> AuditWriter | None:
    """This serving process's audit stream (``p`` and its index, after the replica's name), when
    auditing is on."""
    if not config.audit.enabled:
        return None
    stream = config.audit.stream(f"p{os.environ.get('GATEWAY_PROCESS_INDEX', '0')}")
    return AuditWriter(config.audit, stream, load_private_key(config.audit.signing_key))


def create_app(config: Config, runtime_dir: str, manifests: dict[Unit, Manifest] | None = None,
               pool: WorkerPool | None = None, guards: Sequence[Stage] = (),
               output_policies: Sequence[Stage] = ()) -> Starlette:
    """The gateway's ASGI application; ``pool`` (a ``WorkerPool.of`` in-memory transports, say)
    replaces the pool that follows the supervisor's workers."""
    models = ModelTable(config, load_units(config) if manifests is None else manifests)
    pool = pool or WorkerPool(config, runtime_dir)
    pool.on_swap.append(models.swapped)
    limiter = Limiter(config.limits, config.issuer.max_failed_logins, config.issuer.lockout_s)
    incidents = IncidentStore(Path(config.issuer.incidents_path), config.limits.storage, config.limits.storage_timeout_s)
    issuer = BuiltinIssuer(config, limiter, incidents) if config.issuer.enabled else None
    validator = TokenValidator(config, issuer.store.public_keys if issuer else None)
    policy = Policy(config.rbac)
    decoder = Decoder(config.server)
    in_flight = InFlightBytes(config.server.max_inflight_body_bytes, config.server.max_inflight_body_bytes_per_principal)
    health = GuardHealth()
    watches = WatchStore(config)
    stages = infer_stages(config, models, policy, limiter, pool, decoder, in_flight,
                          [GuardInputs(health), ExtractionGate(watches, limiter), *guards],
                          [GuardVerdict(health, limiter), ExtractionWatch(watches, limiter, health)],
                          [*output_policies, OutputPolicy()], incidents)
    events = EventSink(config.events)
    metrics = Metrics(pool, health, events)
    probes = ProbeTally()
    writer = _audit_writer(config)
    if writer is not None:
        writer.count = metrics.audit_records.inc

    v2 = V2(models, pool, policy, limiter, stages, health, events,
            explain_stages(config, models, policy, limiter, pool, decoder, in_flight, incidents,
                           [ExtractionGate(watches, limiter, explain=True)]), watches, incidents,
            ready_when=config.server.ready_when)
    metrics.watch_state(lambda: {"degraded": v2.degraded(), "controls": incidents.controls.counts(),
                                 "certificates": certificate_expiries(config.tls), "version": __version__,
                                 "jwks": [cache.status() for cache in validator.caches()]})
    owners: dict[str, object] = {
        "v2": v2,
        "incident": IncidentEndpoints(watches, policy, incidents, issuer, config.issuer.token_ttl_s + config.auth.leeway_s),
    }
    if issuer is not None:
        owners["issuer"] = IssuerEndpoints(issuer)
    served = [spec for spec in ROUTES if spec.owner in owners or spec.owner == "ops"]
    owners["ops"] = OpsEndpoints(orjson.dumps(openapi_document(served)), metrics, policy)

    background = AuditBackground(writer, metrics, probes, config.audit.probe_summary_s)

    lifespan = _lifespan(background, events, incidents, pool, decoder, validator, limiter, watches)

    middleware = middleware_stack(config, writer, metrics, probes, limiter, validator, events, incidents)
    handlers: dict[Any, Any] = {GatewayError: functools.partial(_gateway_error, config.server.debug),
                                ProtocolError: _protocol_error, HTTPException: _http_exception}
    app = Starlette(routes=starlette_routes(served, owners), middleware=middleware, exception_handlers=handlers,
                    lifespan=lifespan)
    app.router.redirect_slashes = False  # its redirects are built from the Host header
    app.state.pool = pool
    app.state.validator = validator
    return app


def _lifespan(background: AuditBackground, events: EventSink, incidents: IncidentStore, pool: WorkerPool,
              decoder: Decoder, validator: TokenValidator, limiter: Limiter, watches: WatchStore) -> Any:
    """What starts with the application and stops with it, in that order and the reverse."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await background.start()
        await events.start()
        await incidents.start()
        await pool.start()
        warming = asyncio.get_running_loop().create_task(decoder.warm())
        for cache in validator.caches():  # warm the external providers' keys; failures are retried lazily
            await cache.refresh()
        freeze_startup_heap()
        try:
            yield
        finally:
            warming.cancel()
            decoder.close()
            await pool.close()
            await limiter.close()
            await watches.close()
            await incidents.close()
            await background.stop()
            await events.stop()

    return lifespan


def app_from_environment() -> Starlette:
    """uvicorn factory for the serving processes: ``GATEWAY_CONFIG`` and ``GATEWAY_RUNTIME_DIR``."""
    return create_app(load_config(os.environ["GATEWAY_CONFIG"]), os.environ["GATEWAY_RUNTIME_DIR"])
