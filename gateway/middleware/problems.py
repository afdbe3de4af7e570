"""Every failure becomes RFC 9457 problem+json (https://www.rfc-editor.org/rfc/rfc9457).

``problem_response`` renders a ``GatewayError`` (with ``"error"`` on ``/v2`` routes, which
``tritonclient`` needs); ``ProblemMiddleware`` is the last line: an exception nobody handled is
logged with its request id and answered 500 without internal detail (unless ``debug``).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import SCOPE_KEY
from gateway.errors import GatewayError

__all__ = ["ProblemMiddleware", "problem_response"]

log = logging.getLogger("gateway.errors")


def problem_response(exc: GatewayError, scope: Scope, debug: bool = False) -> Response:
    ctx = scope.get(SCOPE_KEY)
    path = scope.get("path", "")
    if exc.status >= 500 and type(exc).status == 500 and not debug:
        log.error("request %s failed: %s", getattr(ctx, "request_id", "-"), exc.detail)
        exc = type(exc)("internal error; quote the request id when reporting it")
    body = exc.to_problem(path, getattr(ctx, "request_id", None), path.startswith("/v2"))
    headers = dict(exc.headers)
    if ctx is not None:  # refusals raised before the context middleware's own send still carry the id
        headers["X-Request-Id"] = ctx.request_id
    if exc.status == 405 and "allow" in exc.extensions:
        headers["Allow"] = str(exc.extensions["allow"])
    return Response(orjson.dumps(body), status_code=exc.status, headers=headers,
                    media_type="application/problem+json")


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
            ctx: Any = scope.get(SCOPE_KEY)
            if isinstance(exc, GatewayError) and exc.status < 500:
                log.debug("request %s refused: %s", getattr(ctx, "request_id", "-"), exc.detail)
            else:
                log.exception("unhandled error in request %s", getattr(ctx, "request_id", "-"))
            if started:
                raise
            error = exc if isinstance(exc, GatewayError) else GatewayError(
                f"{type(exc).__name__}: {exc}" if self.debug else None
            )
            await problem_response(error, scope, self.debug)(scope, receive, send)
