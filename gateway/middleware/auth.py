"""Authentication: turns a bearer token (or, where allowed, a bare client certificate) into a principal.

Runs after the context middleware and before routing. An invalid token is refused here with 401
``invalid_token``; a request without one passes on with no principal, and every protected
handler then answers 401 (RFC 6750: no error code when no credentials were sent). Health probes
and the built-in issuer's own endpoints take no token.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import AuthConfig
from gateway.context import get_context
from gateway.security.tls import PeerIdentity
from gateway.security.tokens import Principal, TokenValidator, bearer_token

__all__ = ["PUBLIC_PATHS", "AuthMiddleware", "certificate_roles"]

PUBLIC_PATHS = frozenset({
    "/v2/health/live", "/v2/health/ready", "/oauth/token", "/oauth/jwks",
    "/.well-known/openid-configuration", "/.well-known/oauth-authorization-server", "/openapi.json",
})


def certificate_roles(auth: AuthConfig, peer: PeerIdentity | None) -> frozenset[str]:
    """Roles ``auth.certificate_roles`` gives this client certificate (SAN or ``subject:``)."""
    if peer is None or not auth.certificate_roles:
        return frozenset()
    names = set(peer.sans) | {f"subject:{peer.subject}"}
    return frozenset(role for identity, roles in auth.certificate_roles if identity in names for role in roles)


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
                principal = await self.validator.authenticate(token, ctx.peer)
                if cert_roles:
                    principal = _with_roles(principal, cert_roles)
                ctx.principal = principal
            elif cert_roles and not self.auth.require_token and ctx.peer is not None:
                uris = [s[4:] for s in ctx.peer.sans if s.startswith("URI:")]
                ctx.principal = Principal(subject=uris[0] if uris else ctx.peer.subject, kind="certificate",
                                          roles=cert_roles)
        await self.app(scope, receive, send)


def _with_roles(principal: Principal, roles: frozenset[str]) -> Principal:
    from dataclasses import replace

    return replace(principal, roles=principal.roles | roles)
