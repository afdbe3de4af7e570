"""Authentication: turns a bearer token (or, where allowed, a bare client certificate) into a principal.

Runs after the context middleware and before routing. An invalid token is refused here with 401
``invalid_token``, and so is a token, principal or client certificate an operator revoked
(``credential-revoked``); during a lockdown every caller but the break-glass principals gets 503
(``gateway.security.incidents``); a request without one passes on with no principal, and every protected
handler then answers 401 (RFC 6750: no error code when no credentials were sent). Public routes
of the route table (health probes, the built-in issuer's endpoints) take no token.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import AuthConfig
from gateway.context import get_context
from gateway.errors import CredentialRevoked, LockedDown
from gateway.routes import PUBLIC_PATHS
from gateway.security.certificates import certificate_principal, certificate_roles, with_roles
from gateway.security.incidents import IncidentStore
from gateway.security.tokens import TokenValidator, bearer_token

__all__ = ["AuthMiddleware"]


class AuthMiddleware:
    def __init__(self, app: ASGIApp, validator: TokenValidator, auth: AuthConfig,
                 incidents: IncidentStore | None = None) -> None:
        self.app = app
        self.validator = validator
        self.auth = auth
        self.incidents = incidents

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            ctx = get_context(scope)
            token = bearer_token(scope["headers"])
            cert_roles = certificate_roles(self.auth, ctx.peer)
            if token is not None:
                ctx.principal = with_roles(await self.validator.authenticate(token, ctx.peer), cert_roles)
            elif cert_roles and not self.auth.require_token and ctx.peer is not None:
                ctx.principal = certificate_principal(ctx.peer, cert_roles)
            controls = self.incidents.controls if self.incidents is not None else None
            if controls is not None and not controls.empty:  # an operator's revocations and lockdown
                why = controls.refusal(ctx.principal, ctx.peer)
                if why is not None:
                    raise CredentialRevoked(f"{why} by an operator")
                if controls.locked_out(ctx.principal):
                    raise LockedDown("the gateway is locked down by an operator; only break-glass principals "
                                     "are served", retry_after=60)
        await self.app(scope, receive, send)
