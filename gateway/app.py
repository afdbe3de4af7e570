"""The application factory: the middleware stack, outer to inner, in one function."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.audit.chain import load_private_key
from gateway.audit.middleware import AuditMiddleware
from gateway.audit.writer import AuditUnavailable, AuditWriter
from gateway.config import Config, load_config
from gateway.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.middleware import AuthMiddleware, ContextMiddleware, ProblemMiddleware, problem_response
from gateway.middleware.limits import AddressLimitMiddleware, PrincipalLimitMiddleware
from gateway.openapi import openapi_document
from gateway.registry.manifest import load_units
from gateway.security.issuer import BuiltinIssuer
from gateway.security.ratelimit import Limiter
from gateway.security.rbac import Policy
from gateway.security.tls import HANDSHAKES
from gateway.security.tokens import TokenValidator
from gateway.security.xfcc import TrustedProxies
from gateway.v2 import V2, ModelEntry, routes
from gateway.workers.pool import WorkerPool

__all__ = ["app_from_environment", "create_app"]

log = logging.getLogger("gateway.app")


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
    return problem_response(error, request.scope)


def create_app(config: Config, runtime_dir: str, models: dict[str, ModelEntry] | None = None) -> Starlette:
    """Build the gateway: ``audit → problems → context → address limits → auth → principal limits → router``."""
    if models is None:
        manifests = load_units(config)
        models = {m.name: ModelEntry(manifests[m.name], m) for m in config.units()}
    pool = WorkerPool(config, runtime_dir)
    limiter = Limiter(config.limits, config.issuer.max_failed_logins, config.issuer.lockout_s)
    issuer = BuiltinIssuer(config, limiter) if config.issuer.enabled else None
    validator = TokenValidator(config, issuer.store.public_keys if issuer else None)
    policy = Policy(config.rbac)
    v2 = V2(config, models, pool, policy, limiter)
    metrics = Metrics(pool)
    writer = None
    if config.audit.enabled:
        stream = f"p{os.environ.get('GATEWAY_PROCESS_INDEX', '0')}"
        writer = AuditWriter(config.audit, stream, load_private_key(config.audit.signing_key))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        watcher = None
        if writer is not None:
            writer.open()
            await writer.start_ticker()
            watcher = asyncio.get_running_loop().create_task(_watch_handshakes(writer, metrics))
        await pool.start()
        for cache in validator.caches():  # warm the external providers' keys; failures are retried lazily
            await cache.refresh()
        try:
            yield
        finally:
            await pool.close()
            await limiter.close()
            if watcher is not None:
                watcher.cancel()
            if writer is not None:
                await writer.close()

    async def metrics_endpoint(request: Request) -> Response:
        policy.authorize(request.scope, "metrics")
        return Response(await metrics.render(), media_type=CONTENT_TYPE)

    def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return problem_response(exc, request.scope, config.server.debug)

    middleware = [
        Middleware(AuditMiddleware, writer=writer, metrics=metrics, fail_closed=config.audit.fail_closed,
                   known_models=frozenset(m.name for m in config.models)),
        Middleware(ProblemMiddleware, debug=config.server.debug),
        Middleware(ContextMiddleware, trusted_proxies=TrustedProxies(config.tls.trusted_proxies),
                   timeout_s=config.server.request_timeout_s),
        Middleware(AddressLimitMiddleware, limiter=limiter),
        Middleware(AuthMiddleware, validator=validator, auth=config.auth),
        Middleware(PrincipalLimitMiddleware, limiter=limiter),
    ]
    handlers: dict[Any, Any] = {GatewayError: gateway_error, HTTPException: _http_exception}
    document = orjson.dumps(openapi_document())

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    all_routes = [*routes(v2), *(issuer.routes() if issuer else []), Route("/openapi.json", openapi, methods=["GET"]),
                  Route("/metrics", metrics_endpoint, methods=["GET"])]
    app = Starlette(routes=all_routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.pool = pool
    app.state.validator = validator
    return app


async def _watch_handshakes(writer: AuditWriter, metrics: Metrics, every_s: float = 5.0) -> None:
    """Failed TLS handshakes never reach the application: count them and record them as events."""
    seen = 0
    while True:
        await asyncio.sleep(every_s)
        gap = HANDSHAKES["started"] - HANDSHAKES["completed"]
        if gap > seen:
            failed, seen = gap - seen, gap
            metrics.tls_failures.inc(failed)
            log.warning("%d TLS handshake(s) failed in the last %g s (no or an untrusted client certificate, "
                        "or an unsupported protocol)", failed, every_s)
            with contextlib.suppress(AuditUnavailable):
                await writer.append({"kind": "tls", "failed_handshakes": failed, "window_s": every_s})


def app_from_environment() -> Starlette:
    """uvicorn factory for the serving processes: ``GATEWAY_CONFIG`` and ``GATEWAY_RUNTIME_DIR``."""
    return create_app(load_config(os.environ["GATEWAY_CONFIG"]), os.environ["GATEWAY_RUNTIME_DIR"])
