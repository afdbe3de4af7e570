"""Incident controls for operators: the model-extraction alarms in force, and clearing them.

Both take the verb ``admin:incident`` (which the default rules give ``admin`` and, like every
``admin:*`` verb, only with a recent second factor). A clear needs a ``reason``; the request's
audit record names what was cleared, for whom, by whom and why.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.access import authorize
from gateway.context import get_context
from gateway.errors import BadRequest, UnsupportedEncoding
from gateway.guards.watching import WatchStore

__all__ = ["IncidentEndpoints"]

MAX_BODY = 4096


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


class IncidentEndpoints:
    def __init__(self, store: WatchStore, policy: Any) -> None:
        self.store = store
        self.policy = policy

    async def principals(self, request: Request) -> Response:
        """``GET /admin/principals``: the extraction alarms in force, oldest first."""
        authorize(get_context(request.scope), self.policy, "admin:incident")
        return _json({"alarms": [a.as_dict() for a in await self.store.in_force()]})

    async def clear_principal(self, request: Request) -> Response:
        """``POST /admin/principals/clear`` ``{"principal", "model"?, "reason"}``: lift the principal's
        alarms (on one model, or all) and forget its watched queries."""
        ctx = get_context(request.scope)
        authorize(ctx, self.policy, "admin:incident")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise UnsupportedEncoding("send application/json")
        body = await request.body()
        if len(body) > MAX_BODY:
            raise BadRequest(f"at most {MAX_BODY} bytes")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"malformed JSON: {exc}") from None
        principal, model, reason = (doc.get(k) if isinstance(doc, dict) else None for k in ("principal", "model", "reason"))
        if not isinstance(principal, str) or not principal or len(principal) > 512:
            raise BadRequest('"principal" must name the principal as the alarm does (issuer|subject)')
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000:
            raise BadRequest('"reason" is required: why the principal is cleared (kept in the audit log)')
        if model is not None and (not isinstance(model, str) or len(model) > 128):
            raise BadRequest('"model", when given, names one model')
        cleared = await self.store.clear(principal, model)
        ctx.action = {"action": "clear-principal", "principal": principal, "model": model, "reason": reason.strip(),
                      "cleared": [a.as_dict() for a in cleared]}
        return _json({"principal": principal, "model": model, "cleared": [a.as_dict() for a in cleared]})
