"""Every failure becomes RFC 9457 problem+json (https://www.rfc-editor.org/rfc/rfc9457).

``ProblemResponse`` and ``send_problem`` render a ``GatewayError`` through the one renderer
(``gateway.errors.render_problem``: ``"error"`` on ``/v2`` routes, which ``tritonclient`` needs) and
note the error in the request context, where the audit layer reads it. ``ProblemMiddleware`` is
the last line: an exception nobody handled is logged with its request id and answered 500
without internal detail (unless ``debug``).
"""

from __future__ import annotations

import logging

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import REFUSAL_KEY, SCOPE_KEY, RequestContext
from gateway.errors import ClientClosedRequest, GatewayError, render_problem

__all__ = ["ProblemMiddleware", "ProblemResponse", "send_problem"]

log = logging.getLogger("gateway.errors")


def _render(exc: GatewayError, scope: Scope, debug: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    refusal = scope.get(REFUSAL_KEY)
    if isinstance(exc, ClientClosedRequest) and isinstance(refusal, GatewayError):
        exc = refusal  # the HTTP protocol closed the connection itself (a body too slow), and said why
    ctx = scope.get(SCOPE_KEY)
    request_id = None
    if isinstance(ctx, RequestContext):
        ctx.error = exc
        request_id = ctx.request_id
    if exc.status >= 500 and type(exc).status == 500:
        log.error("request %s failed: %s", request_id or "-", exc.detail)
    path = scope.get("path", "")
    return render_problem(exc, path, request_id, path.startswith("/v2"), debug)


class ProblemResponse(Response):
    def __init__(self, exc: GatewayError, scope: Scope, debug: bool = False) -> None:
        status, headers, body = _render(exc, scope, debug)
        super().__init__(body, status_code=status)
        self.raw_headers = headers


async def send_problem(send: Send, scope: Scope, exc: GatewayError, debug: bool = False) -> None:
    status, headers, body = _render(exc, scope, debug)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ProblemMiddleware:
    def __init__(self, app: ASGIApp, debug: bool = False) -> None:
        self.app = app
        self.debug = debug

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            ctx = scope.get(SCOPE_KEY)
            request_id = ctx.request_id if isinstance(ctx, RequestContext) else "-"
            if isinstance(exc, GatewayError) and exc.status < 500:
                log.debug("request %s refused: %s", request_id, exc.detail)
            else:
                log.exception("unhandled error in request %s", request_id)
            if started:
                raise
            error = exc if isinstance(exc, GatewayError) else GatewayError(
                f"{type(exc).__name__}: {exc}" if self.debug else None
            )
            await send_problem(send, scope, error, self.debug)
