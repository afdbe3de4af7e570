"""Per-request state: one typed object under one namespaced scope key.

The context middleware opens it; each layer and stage writes only its own fields (see
``docs/architecture.md``): authentication the principal, authorization the decision, the
model-aware stages the model, version, worker, tensor digests and findings, and whatever refused
the request the error. The audit layer reads it to write the request's record; nothing re-parses
a response to learn what happened.
"""

from __future__ import annotations

import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.security.types import Charge, Decision, PeerIdentity, Principal

if TYPE_CHECKING:
    from gateway.errors import GatewayError
    from gateway.routes import RouteSpec

__all__ = ["REFUSAL_KEY", "SCOPE_KEY", "Finding", "RequestContext", "SecurityEvent", "TensorDigest", "get_context"]

SCOPE_KEY = "gateway.context"
REFUSAL_KEY = "gateway.refusal"
"""Set by the HTTP protocol on a request it refuses below the application (malformed, too slow,
over the concurrency limit): the error travels through the stack so that it is rendered and
recorded like any other refusal."""


@dataclass(frozen=True, slots=True)
class TensorDigest:
    """What the audit record keeps of a tensor: its description, size and SHA-256, never its data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape), "bytes": self.bytes,
                "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Finding:
    """What a guard or output stage noticed about a request, whether or not it refused it."""

    stage: str
    kind: str
    detail: str
    action: str = "record"
    """``record`` (noted only), ``flag``, ``throttle`` or ``reject``."""
    technique: str | None = None
    """MITRE ATLAS technique id, where one applies."""
    score: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "kind": self.kind, "detail": self.detail, "action": self.action}
        if self.technique:
            out["technique"] = self.technique
        if self.score is not None:
            out["score"] = self.score
        return out


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """What a detection is, for an audit record, a metric and a SIEM."""

    principal: str
    model: str
    version: str
    detector: str
    score: float
    threshold: float
    action: str
    technique: str
    """MITRE ATLAS technique: AML.T0043 (craft adversarial data), AML.T0015 (evade ML model)."""
    request_id: str
    scores: dict[str, float] = field(default_factory=dict)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"))
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "security-event",
            "event_id": self.event_id,
            "time": self.time,
            "request_id": self.request_id,
            "principal": self.principal,
            "model": self.model,
            "version": self.version,
            "detector": self.detector,
            "score": round(self.score, 6),
            "threshold": round(self.threshold, 6),
            "action": self.action,
            "technique": self.technique,
            "scores": {k: round(v, 6) for k, v in self.scores.items()},
        }


@dataclass(slots=True)
class RequestContext:
    request_id: str
    """Minted by the gateway for every request, never taken from the client."""
    started: float
    deadline: float
    client_host: str | None
    peer: PeerIdentity | None
    correlation_id: str | None = None
    """The client's own ``X-Request-Id``, when it sent a well-formed one (kept apart from ours)."""
    route: RouteSpec | None = None
    principal: Principal | None = None
    """Set by the authentication middleware; None when the request carried no credentials."""
    decision: Decision | None = None
    """The access decision, with the rule behind it, once one was asked for."""
    model: str | None = None
    """The model the request named (recorded only when it is a configured one)."""
    version: str | None = None
    """The model version that served (or was to serve) the request."""
    worker: str | None = None
    inputs: list[TensorDigest] = field(default_factory=list)
    outputs: list[TensorDigest] = field(default_factory=list)
    """What the caller received (after the output policy)."""
    output_policy: str | None = None
    """The output policy applied, when it was not ``full``."""
    findings: list[Finding] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    """The guard's detector scores (each the largest over the request's rows) and their combination."""
    events: list[SecurityEvent] = field(default_factory=list)
    """Security events the request raised; written as their own audit records, counted, sent on
    (``gateway.events``)."""
    error: GatewayError | None = None
    """The refusal or failure the request was answered with."""
    action: dict[str, Any] | None = None
    """What an administrative request changed, with its reason (incident controls)."""
    charges: list[Charge] = field(default_factory=list)
    """Limits gathered on the way in and not admitted yet (``gateway.security.ratelimit``)."""
    failed_auth_counted: bool = False
    """The built-in issuer counts its refusals against the address's failed-auth limit itself,
    while it judges (so sign-ins sent together cannot all pass the limit); the address layer does not."""

    def take_charges(self, *more: Charge) -> list[Charge]:
        """What the request still owes (and ``more``), for one admission; the request then owes nothing."""
        charges, self.charges = [*self.charges, *more], []
        return charges


def get_context(scope: MutableMapping[str, Any]) -> RequestContext:
    ctx: RequestContext = scope[SCOPE_KEY]
    return ctx
