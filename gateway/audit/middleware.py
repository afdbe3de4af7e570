"""One audit record for every request, handed to the writer before its response completes.

The outermost middleware: it sees the final answer of every request, including the refusals
rendered by the problem middleware and the limiters, and those the HTTP protocol made below the
application (malformed requests, slow clients, too many in flight), which travel through the stack
for that reason. The response is held until its record is on disk; if the record cannot be
written, the client gets 503 instead (``audit.fail_closed``), so nothing is served unrecorded. The
record is made from the request context: who (certificate and principal), what (route, verb,
model and version, input and output digests, findings), the decision and the rule or the error
behind it, and the outcome; never tokens, secrets or tensor data.

Health probes are the exception: a prober calls them constantly, and a record (and an fsync) each
would let one connection fill the disk. They are counted instead (``ProbeTally``) and written as
one ``probes`` record per ``audit.probe_summary_s`` with the count by path, status and address.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.audit.chain import canonical
from gateway.audit.writer import AuditUnavailable, AuditWriter
from gateway.context import SCOPE_KEY, RequestContext
from gateway.errors import GatewayError, TooManyRequests
from gateway.events import EventSink
from gateway.metrics import Metrics
from gateway.middleware.problems import send_problem
from gateway.routes import LIVENESS_PATH, PROBE_PATHS
from gateway.security.types import Decision, PeerIdentity, Principal

__all__ = ["AuditMiddleware", "ProbeTally", "outcome"]

log = logging.getLogger("gateway.audit")
UNRECORDED_WHEN_FAILING = frozenset({LIVENESS_PATH})


def outcome(status: int, error: GatewayError | None) -> str:
    if status < 400:
        return "allow"
    if status in (401, 403) or (status == 404 and (error is None or error.type == "not-found")):
        return "deny"
    if status == 429:
        return "throttled"
    if status >= 500:
        return "error"
    return "rejected"


class ProbeTally:
    """Health probes answered since the last summary, by path, status and client address."""

    MAX_KEYS = 1000
    """Distinct (path, status, address) kept per window; more are counted under address "other"."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int, str], int] = {}

    def add(self, path: str, status: int, address: str) -> None:
        key = (path, status, address)
        if key not in self.counts and len(self.counts) >= self.MAX_KEYS:
            key = (path, status, "other")
        self.counts[key] = self.counts.get(key, 0) + 1

    def summary(self, window_s: float) -> dict[str, Any] | None:
        """The ``probes`` record of what was counted (and a fresh count), or None if nothing was."""
        counts, self.counts = self.counts, {}
        if not counts:
            return None
        return {"kind": "probes", "window_s": window_s, "total": sum(counts.values()),
                "counts": [{"path": p, "status": st, "address": a, "count": n} for (p, st, a), n in sorted(counts.items())]}


class AuditMiddleware:
    def __init__(self, app: ASGIApp, writer: AuditWriter | None, metrics: Metrics, fail_closed: bool,
                 known_models: frozenset[str], probes: ProbeTally | None = None, events: EventSink | None = None) -> None:
        self.app = app
        self.writer = writer
        self.metrics = metrics
        self.fail_closed = fail_closed
        self.known_models = known_models
        self.probes = probes
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        writer = self.writer
        if (self.fail_closed and writer is not None and writer.failed is not None
                and started < writer.retry_at and scope["path"] not in UNRECORDED_WHEN_FAILING):
            # Refuse before doing the work: this request could not be recorded.
            await send_problem(send, scope, AuditUnavailable(
                f"the audit log cannot be written ({writer.failed}); nothing is served unrecorded", retry_after=2))
            return
        if self.probes is not None and scope["path"] in PROBE_PATHS:
            await self._probe(scope, receive, send, started)
            return
        held: Message | None = None
        status = 0
        recorded = False

        async def hold(message: Message) -> None:
            nonlocal held, status, recorded
            if message["type"] == "http.response.start":
                held, status = message, message["status"]
                return
            if message["type"] == "http.response.body" and not recorded and not message.get("more_body", False):
                recorded = True
                try:
                    await self._record(scope, status, started)
                except AuditUnavailable as exc:
                    if self.fail_closed and scope["path"] not in UNRECORDED_WHEN_FAILING:
                        await send_problem(send, scope, exc)
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
                    await self._record(scope, status or 499, started)
                except AuditUnavailable:
                    ctx = _ctx(scope)
                    log.error("request %s could not be recorded", ctx.request_id if ctx else "-")

    async def _probe(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        """A health probe: answered at once, counted into the next ``probes`` record."""
        assert self.probes is not None
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self._observe(scope, _ctx(scope), status or 499, started)
            client = scope.get("client")
            self.probes.add(scope["path"], status or 499, client[0] if client else "unknown")

    def _observe(self, scope: Scope, ctx: RequestContext | None, status: int, started: float) -> tuple[str, str, float]:
        """The request's metrics: its route's name, its outcome and its latency (also returned)."""
        seconds = time.monotonic() - started
        result = outcome(status, ctx.error if ctx is not None else None)
        spec = getattr(scope.get("route"), "spec", None)
        route = spec.handler if spec is not None else "none"
        model = ctx.model if ctx is not None and ctx.model in self.known_models else ""
        error = ctx.error if ctx is not None else None
        version = ctx.version if model and ctx is not None and ctx.version is not None else "-"
        policy = error.extensions.get("policy") if isinstance(error, TooManyRequests) else None
        self.metrics.observe(route, model or "-", result, status, seconds, error.type if error is not None else None,
                             version, str(policy) if policy is not None else None)
        return route, result, seconds

    async def _record(self, scope: Scope, status: int, started: float) -> None:
        ctx = _ctx(scope)
        route, result, seconds = self._observe(scope, ctx, status, started)
        events = [e.as_dict() for e in ctx.events] if ctx is not None else []
        for event in events:
            self.metrics.security_events.labels(event["model"], event["detector"], event["action"]).inc()
            if self.events is not None:
                self.events.offer(event)
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
        }
        client = scope.get("client")
        record["client"] = _client(client[0] if client else None, ctx.peer if ctx is not None else None)
        if ctx is not None:
            _describe(record, ctx)
        await self.writer.append(*events, record)  # events: their own record kind, before the request's


def _describe(record: dict[str, Any], ctx: RequestContext) -> None:
    """What the context knows of the request, into its record."""
    if ctx.correlation_id:
        record["correlation_id"] = ctx.correlation_id
    if ctx.principal is not None:
        record["principal"] = _part(ctx.principal)
    if ctx.model:
        record["model"] = ctx.model[:128]
    if ctx.decision is not None:
        record["decision"] = _part(ctx.decision)
    if ctx.version is not None:
        record["version"] = ctx.version
    if ctx.worker is not None:
        record["worker"] = ctx.worker
    if ctx.inputs:
        record["inputs"] = [d.as_dict() for d in ctx.inputs]
    if ctx.outputs:
        record["outputs"] = [d.as_dict() for d in ctx.outputs]
    if ctx.output_policy is not None:
        record["output_policy"] = ctx.output_policy
    if ctx.findings:
        record["findings"] = [f.as_dict() for f in ctx.findings]
    if ctx.scores:
        record["scores"] = {k: round(v, 6) for k, v in ctx.scores.items()}
    if ctx.action is not None:
        record["action"] = ctx.action
    if ctx.error is not None:
        record["reason"] = {"type": ctx.error.type, "detail": ctx.error.detail[:300]}


def _ctx(scope: Scope) -> RequestContext | None:
    ctx = scope.get(SCOPE_KEY)
    return ctx if isinstance(ctx, RequestContext) else None


@functools.lru_cache(maxsize=4096)
def _part(value: Principal | Decision) -> orjson.Fragment:
    """A part that many records share (the same caller, the same rule), in canonical JSON once: the
    record around it serializes to the same bytes as with the part's fields inline."""
    return orjson.Fragment(canonical(value.as_dict()))


@functools.lru_cache(maxsize=4096)
def _client(address: str | None, peer: PeerIdentity | None) -> orjson.Fragment:
    """The connection's client: its address and, when it presented one, its certificate."""
    out: dict[str, Any] = {"address": address}
    if peer is not None:
        out.update(cert_sha256=peer.fingerprint_sha256, subject=peer.subject, sans=list(peer.sans)[:8],
                   source=peer.source)
    return orjson.Fragment(canonical(out))
