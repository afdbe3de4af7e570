"""Opens the per-request context: request id, deadline, and the peer's identity.

The identity comes from the verified client certificate that ``gateway.server`` put into
``scope["extensions"]["tls"]``, or, only when the TCP peer is a configured trusted proxy, from
``X-Forwarded-Client-Cert``. From anyone else that header is removed before the app sees it.

The request id is always the gateway's own: a client's ``X-Request-Id`` is kept as the request's
correlation id (when well-formed), never reused as ours, so two records never share an id.

A request the HTTP protocol refused below the application (``REFUSAL_KEY``) is raised here, once
its context exists, so that it is rendered and recorded like any other refusal.
"""

from __future__ import annotations

import os
import re
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import REFUSAL_KEY, SCOPE_KEY, RequestContext
from gateway.security.xfcc import TrustedProxies, parse_xfcc

__all__ = ["ContextMiddleware"]

XFCC = b"x-forwarded-client-cert"
REQUEST_ID = b"x-request-id"
_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{8,128}")


class ContextMiddleware:
    def __init__(self, app: ASGIApp, trusted_proxies: TrustedProxies, timeout_s: float) -> None:
        self.app = app
        self.trusted = trusted_proxies
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        host = client[0] if client else None
        tls = scope.get("extensions", {}).get("tls") or {}
        peer = tls.get("client_identity")
        correlation = None
        xfcc = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID and _VALID_ID.fullmatch(value):
                correlation = value.decode()
            elif name == XFCC:
                xfcc = value
        if xfcc is not None:
            if self.trusted.trusts(host):
                peer = parse_xfcc(xfcc.decode("latin-1"), self.trusted.hops) or peer
            else:
                scope["headers"] = [(n, v) for n, v in scope["headers"] if n != XFCC]
        request_id = os.urandom(16).hex()
        now = time.monotonic()
        scope[SCOPE_KEY] = RequestContext(request_id, now, now + self.timeout_s, host, peer, correlation)
        refusal = scope.get(REFUSAL_KEY)
        if refusal is not None:
            raise refusal

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
