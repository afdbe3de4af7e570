"""Authentication: turns a bearer token (or, where allowed, a bare client certificate) into a principal.

Runs after the context middleware and before routing. An invalid token is refused here with 401
``invalid_token``; a request without one passes on with no principal, and every protected
handler then answers 401 (RFC 6750: no error code when no credentials were sent). Public routes
of the route table (health probes, the built-in issuer's endpoints) take no token.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import AuthConfig
from gateway.context import get_context
from gateway.routes import PUBLIC_PATHS
from gateway.security.certificates import certificate_principal, certificate_roles, with_roles
from gateway.security.tokens import TokenValidator, bearer_token

__all__ = ["AuthMiddleware"]


class AuthMiddleware:
    def __init__(self, app: ASGIApp, validator: TokenValidator, auth: AuthConfig) -> None:
        self.app = app
        self.validator = validator
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            ctx = get_context(scope)
            token = bearer_token(scope["headers"])
            cert_roles = certificate_roles(self.auth, ctx.peer)
            if token is not None:
                ctx.principal = with_roles(await self.validator.authenticate(token, ctx.peer), cert_roles)
            elif cert_roles and not self.auth.require_token and ctx.peer is not None:
                ctx.principal = certificate_principal(ctx.peer, cert_roles)
        await self.app(scope, receive, send)
