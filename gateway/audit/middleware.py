"""One audit record for every request, handed to the writer before its response completes.

The outermost middleware: it sees the final answer of every request, including the refusals
rendered by the problem middleware and the limiters. The response is held until its record is
on disk; if the record cannot be written, the client gets 503 instead (``audit.fail_closed``),
so nothing is served unrecorded. The record names who (certificate and principal), what (route,
verb, model and version, input and output digests), the decision and the rule or reason behind
it, and the outcome; never tokens, secrets or tensor data.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.audit.writer import AuditUnavailable, AuditWriter
from gateway.context import SCOPE_KEY, RequestContext
from gateway.errors import GatewayError, problem_body
from gateway.metrics import Metrics

__all__ = ["AuditMiddleware", "outcome"]

log = logging.getLogger("gateway.audit")
UNRECORDED_WHEN_FAILING = frozenset({"/v2/health/live"})


def outcome(status: int, problem_type: str | None) -> str:
    if status < 400:
        return "allow"
    if status in (401, 403) or (status == 404 and problem_type is None):
        return "deny"
    if status == 429:
        return "throttled"
    if status >= 500:
        return "error"
    return "rejected"


class AuditMiddleware:
    def __init__(self, app: ASGIApp, writer: AuditWriter | None, metrics: Metrics, fail_closed: bool,
                 known_models: frozenset[str]) -> None:
        self.app = app
        self.writer = writer
        self.metrics = metrics
        self.fail_closed = fail_closed
        self.known_models = known_models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        writer = self.writer
        if (self.fail_closed and writer is not None and writer.failed is not None
                and started < writer.retry_at and scope["path"] not in UNRECORDED_WHEN_FAILING):
            # Refuse before doing the work: this request could not be recorded.
            await _send_problem(send, scope, AuditUnavailable(
                f"the audit log cannot be written ({writer.failed}); nothing is served unrecorded", retry_after=2))
            return
        held: Message | None = None
        status = 0
        body_head = b""
        recorded = False

        async def hold(message: Message) -> None:
            nonlocal held, status, body_head, recorded
            if message["type"] == "http.response.start":
                held, status = message, message["status"]
                return
            if message["type"] == "http.response.body" and not recorded:
                body_head = message.get("body", b"")[:4096]
                if not message.get("more_body", False):
                    recorded = True
                    try:
                        await self._record(scope, status, body_head, started)
                    except AuditUnavailable as exc:
                        if self.fail_closed and scope["path"] not in UNRECORDED_WHEN_FAILING:
                            await _send_problem(send, scope, exc)
                            return
                if held is not None:
                    await send(held)
                    held = None
            await send(message)

        try:
            await self.app(scope, receive, hold)
        finally:
            if not recorded:  # the client went away, or nothing was answered: still one record
                recorded = True
                try:
                    await self._record(scope, status or 499, body_head, started)
                except AuditUnavailable:
                    ctx = _ctx(scope)
                    log.error("request %s could not be recorded", ctx.request_id if ctx else "-")

    async def _record(self, scope: Scope, status: int, body_head: bytes, started: float) -> None:
        seconds = time.monotonic() - started
        ctx = _ctx(scope)
        problem: dict[str, Any] = {}
        if status >= 400 and body_head.startswith(b"{"):
            try:
                problem = orjson.loads(body_head)
            except orjson.JSONDecodeError:
                problem = {}
        problem_type = str(problem.get("type", "")).rsplit(":", 1)[-1] or None
        result = outcome(status, problem_type if problem_type != "not-found" else None)
        endpoint = scope.get("endpoint")
        route = getattr(endpoint, "__name__", "none")
        model = ctx.model if ctx is not None and ctx.model in self.known_models else ""
        self.metrics.observe(route, model or "-", result, status, seconds)
        if self.writer is None:
            return
        record: dict[str, Any] = {
            "kind": "request",
            "request_id": ctx.request_id if ctx else None,
            "method": scope.get("method"),
            "path": scope.get("path", "")[:512],
            "route": route,
            "status": status,
            "outcome": result,
            "latency_ms": round(seconds * 1000, 3),
            "client": _client(scope, ctx),
        }
        if ctx is not None:
            if ctx.principal is not None:
                p = ctx.principal
                record["principal"] = {"subject": p.subject, "kind": p.kind, "issuer": p.issuer,
                                       "client_id": p.client_id, "roles": sorted(p.roles), "amr": list(p.amr),
                                       "acr": p.acr, "token_id": p.token_id}
            if ctx.model:
                record["model"] = ctx.model[:128]
            if ctx.decision is not None:
                record["decision"] = ctx.decision.as_dict()
            for key in ("version", "worker", "inputs", "outputs"):
                if key in ctx.extra:
                    record[key] = ctx.extra[key]
        if problem_type:
            record["reason"] = {"type": problem_type, "detail": str(problem.get("detail", ""))[:300]}
        await self.writer.append(record)
        self.metrics.audit_records.inc()


def _ctx(scope: Scope) -> RequestContext | None:
    ctx = scope.get(SCOPE_KEY)
    return ctx if isinstance(ctx, RequestContext) else None


def _client(scope: Scope, ctx: RequestContext | None) -> dict[str, Any]:
    client = scope.get("client")
    out: dict[str, Any] = {"address": client[0] if client else None}
    peer = ctx.peer if ctx is not None else None
    if peer is not None:
        out.update(cert_sha256=peer.fingerprint_sha256, subject=peer.subject, sans=list(peer.sans)[:8],
                   source=peer.source)
    return out


async def _send_problem(send: Send, scope: Scope, exc: GatewayError) -> None:
    ctx = _ctx(scope)
    path = scope.get("path", "")
    body = orjson.dumps(problem_body(exc.status, exc.type, exc.title, exc.detail, path,
                                     ctx.request_id if ctx else None, path.startswith("/v2")))
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if ctx is not None:
        headers.append((b"x-request-id", ctx.request_id.encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
