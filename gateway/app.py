"""The application factory: the middleware stack, outer to inner, in one function."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.config import Config, load_config
from gateway.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.middleware import AuthMiddleware, ContextMiddleware, ProblemMiddleware, problem_response
from gateway.middleware.limits import AddressLimitMiddleware, PrincipalLimitMiddleware
from gateway.openapi import openapi_document
from gateway.registry.manifest import load_manifests
from gateway.security.issuer import BuiltinIssuer
from gateway.security.ratelimit import Limiter
from gateway.security.rbac import Policy
from gateway.security.tokens import TokenValidator
from gateway.security.xfcc import TrustedProxies
from gateway.v2 import V2, ModelEntry, routes
from gateway.workers.pool import WorkerPool

__all__ = ["app_from_environment", "create_app"]


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
    """Build the gateway: ``problems → context → address limits → auth → principal limits → router``."""
    if models is None:
        manifests = load_manifests(Path(config.models_root), {m.name: m.version for m in config.models})
        models = {m.name: ModelEntry(manifests[m.name], m) for m in config.models}
    pool = WorkerPool(config, runtime_dir)
    limiter = Limiter(config.limits, config.issuer.max_failed_logins, config.issuer.lockout_s)
    issuer = BuiltinIssuer(config, limiter) if config.issuer.enabled else None
    validator = TokenValidator(config, issuer.store.public_keys if issuer else None)
    v2 = V2(config, models, pool, Policy(config.rbac), limiter)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.start()
        for cache in validator.caches():  # warm the external providers' keys; failures are retried lazily
            await cache.refresh()
        try:
            yield
        finally:
            await pool.close()
            await limiter.close()

    def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return problem_response(exc, request.scope, config.server.debug)

    middleware = [
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

    all_routes = [*routes(v2), *(issuer.routes() if issuer else []), Route("/openapi.json", openapi, methods=["GET"])]
    app = Starlette(routes=all_routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.pool = pool
    app.state.validator = validator
    return app


def app_from_environment() -> Starlette:
    """uvicorn factory for the serving processes: ``GATEWAY_CONFIG`` and ``GATEWAY_RUNTIME_DIR``."""
    return create_app(load_config(os.environ["GATEWAY_CONFIG"]), os.environ["GATEWAY_RUNTIME_DIR"])
