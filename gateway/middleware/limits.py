"""Rate limiting around authentication: by address before it, by principal after it.

``AddressLimitMiddleware`` sits outside authentication: it counts health probes per client address
in this process's memory (``per-address-probes``), and every other request per client address, refuses an address that has sent too many bad credentials lately
(``failed-auth``), and counts each 401, and each refused sign-in at the token endpoint, against
it. ``PrincipalLimitMiddleware`` sits inside authentication and counts per principal and
globally. Model-level limits and budgets are applied by the inference handler, which knows the
model and the number of input rows.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import get_context
from gateway.errors import GatewayError
from gateway.routes import PROBE_PATHS
from gateway.security.issuer import TOKEN_PATH
from gateway.security.ratelimit import Limiter

__all__ = ["AddressLimitMiddleware", "PrincipalLimitMiddleware"]


class AddressLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        address = get_context(scope).client_host or "unknown"
        if scope["path"] in PROBE_PATHS:
            await self.limiter.hit(self.limiter.per_address_probes, address, local=True)
            await self.app(scope, receive, send)
            return
        await self.limiter.exceeded(self.limiter.failed_auth, address)
        await self.limiter.hit(self.limiter.per_address, address)
        refused = False

        async def watch(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start":
                status = message["status"]
                refused = status == 401 or (scope["path"] == TOKEN_PATH and status in (400, 401))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except GatewayError as exc:
            refused = exc.status == 401
            raise
        finally:
            if refused:
                try:
                    await self.limiter.hit(self.limiter.failed_auth, address)
                except GatewayError:
                    pass  # over the limit now: the next request from this address is refused up front


class PrincipalLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            principal = get_context(scope).principal
            if principal is not None:
                await self.limiter.hit(self.limiter.per_principal, principal.key)
                await self.limiter.hit(self.limiter.global_, "all")
        await self.app(scope, receive, send)
