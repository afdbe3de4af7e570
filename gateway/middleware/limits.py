"""Rate limiting around authentication: by address before it, by principal after it.

Each layer adds its charges to the request's context and one admission counts them together
(``gateway.security.ratelimit``: one Redis round trip). ``AddressLimitMiddleware`` sits outside
authentication: it counts health probes per client address in this process's memory
(``per-address-probes``); for every other request it refuses up front an address this process
knows to be over its limit, and charges the request to its address and to the address's
failed-auth limit (which needs room for one); it counts each 401, and each refused sign-in at the
token endpoint, against that limit (the built-in issuer counts the sign-ins it judges itself,
while it judges them: ``RequestContext.failed_auth_counted``). ``PrincipalLimitMiddleware`` sits
inside authentication and charges per principal and globally, then admits what the request owes so far, except for an
inference or an explanation, whose model-level stage admits it with the model's limits and
budgets. Whatever a request owes and was never admitted (it was refused on the way) is counted
when it ends.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import get_context
from gateway.errors import GatewayError
from gateway.routes import PROBE_PATHS
from gateway.security.issuer import TOKEN_PATH
from gateway.security.ratelimit import Charge, Limiter

__all__ = ["AddressLimitMiddleware", "PrincipalLimitMiddleware"]

_MODEL_CALLS = ("/infer", "/explain")


class AddressLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        address = ctx.client_host or "unknown"
        limiter = self.limiter
        if scope["path"] in PROBE_PATHS:
            await limiter.hit(limiter.per_address_probes, address, local=True)
            await self.app(scope, receive, send)
            return
        limiter.refuse_known(limiter.failed_auth, address)
        limiter.refuse_known(limiter.per_address, address)
        ctx.charges += (Charge(limiter.failed_auth, address, 0), Charge(limiter.per_address, address))
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
            if exc.status == 401 and not ctx.failed_auth_counted:  # not answered yet: over its limits, 429
                await limiter.admit(ctx.take_charges(Charge(limiter.failed_auth, address)))
            raise
        finally:
            failed = (Charge(limiter.failed_auth, address),) if refused and not ctx.failed_auth_counted else ()
            if ctx.charges or failed:
                await limiter.count(ctx.take_charges(*failed))


class PrincipalLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        limiter = self.limiter
        principal = ctx.principal
        if principal is not None:
            limiter.refuse_known(limiter.per_principal, principal.key)
            limiter.refuse_known(limiter.global_, "all")
            ctx.charges += (Charge(limiter.per_principal, principal.key), Charge(limiter.global_, "all"))
        if principal is None or not scope["path"].endswith(_MODEL_CALLS):
            await limiter.admit(ctx.take_charges())
        await self.app(scope, receive, send)
