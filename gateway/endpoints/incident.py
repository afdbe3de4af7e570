"""Incident controls for operators: revocations, quarantine, lockdown, the issuer's key, and the
model-extraction alarms.

Every route takes the verb ``admin:incident`` (which the default rules give ``admin`` and, like
every ``admin:*`` verb, only with a recent second factor). Every change needs a ``reason``; the
request's audit record names what changed, by whom and why (``action``).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.access import authorize
from gateway.context import get_context
from gateway.errors import BadRequest, GatewayError, UnsupportedEncoding
from gateway.guards.watching import WatchStore
from gateway.security.incidents import IncidentError, IncidentStore
from gateway.stages.body import read_body

__all__ = ["IncidentEndpoints"]

MAX_BODY = 4096


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


class IncidentEndpoints:
    def __init__(self, store: WatchStore, policy: Any, incidents: IncidentStore, issuer: Any = None,
                 keep_retired_s: float = 0.0) -> None:
        self.store = store
        self.policy = policy
        self.incidents = incidents
        self.issuer = issuer
        self.keep_retired_s = keep_retired_s

    async def principals(self, request: Request) -> Response:
        """``GET /admin/principals``: the extraction alarms in force, oldest first."""
        authorize(get_context(request.scope), self.policy, "admin:incident")
        return _json({"alarms": [a.as_dict() for a in await self.store.in_force()]})

    async def clear_principal(self, request: Request) -> Response:
        """``POST /admin/principals/clear`` ``{"principal", "model"?, "reason"}``: lift the principal's
        alarms (on one model, or all) and forget its watched queries."""
        ctx = get_context(request.scope)
        authorize(ctx, self.policy, "admin:incident")
        doc = await _document(request)
        principal, model, reason = doc.get("principal"), doc.get("model"), _reason(doc)
        if not isinstance(principal, str) or not principal or len(principal) > 512:
            raise BadRequest('"principal" must name the principal as the alarm does (issuer|subject)')
        if model is not None and (not isinstance(model, str) or len(model) > 128):
            raise BadRequest('"model", when given, names one model')
        cleared = await self.store.clear(principal, model)
        ctx.action = {"action": "clear-principal", "principal": principal, "model": model, "reason": reason,
                      "cleared": [a.as_dict() for a in cleared]}
        return _json({"principal": principal, "model": model, "cleared": [a.as_dict() for a in cleared]})

    async def status(self, request: Request) -> Response:
        """``GET /admin/incidents``: the controls in force (revocations, quarantine, lockdown)."""
        authorize(get_context(request.scope), self.policy, "admin:incident")
        incidents = self.incidents
        body: dict[str, Any] = {"controls": incidents.controls.as_dict()}
        if incidents.degraded:
            body["degraded"] = f"incident-control storage unreachable: {incidents.degraded}"
        return _json(body)

    async def act(self, request: Request) -> Response:
        """``POST /admin/incidents`` ``{"action", "reason", ...}``: one control, on every replica."""
        ctx = get_context(request.scope)
        principal = authorize(ctx, self.policy, "admin:incident")
        doc = await _document(request)
        action, reason = doc.get("action"), _reason(doc)
        params = {k: v for k, v in doc.items() if k not in ("action", "reason")}
        try:
            controls = await self.incidents.act(str(action), params, principal.key, reason)
        except IncidentError as exc:
            raise _refusal(exc) from None
        ctx.action = {"action": action, **params, "reason": reason, "version": controls.version}
        return _json({"action": action, "version": controls.version, "controls": controls.as_dict()})

    async def rotate_key(self, request: Request) -> Response:
        """``POST /admin/keys/rotate`` ``{"reason"}``: a new signing key for the built-in issuer now
        (tokens signed by the previous one verify until they expire; revoke them to end them sooner)."""
        ctx = get_context(request.scope)
        authorize(ctx, self.policy, "admin:incident")
        reason = _reason(await _document(request))
        if self.issuer is None:
            raise _refusal(IncidentError("the built-in issuer is off: rotate the keys at your provider", 409))
        kid = self.issuer.store.rotate(keep_retired_s=self.keep_retired_s)
        ctx.action = {"action": "rotate-key", "kid": kid, "reason": reason}
        return _json({"kid": kid})



async def _document(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise UnsupportedEncoding("send application/json")
    body = await read_body(request.receive, request.headers, MAX_BODY)  # refused past it, not read whole first
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("expected a JSON object")
    return doc


def _reason(doc: dict[str, Any]) -> str:
    reason = doc.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000:
        raise BadRequest('"reason" is required: why (kept in the audit log)')
    return reason.strip()


class IncidentRefused(GatewayError):
    type = "incident-action-refused"
    title = "The incident action was not applied"


def _refusal(exc: IncidentError) -> GatewayError:
    error = IncidentRefused(str(exc))
    error.status = exc.status
    return error
