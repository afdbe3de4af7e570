"""The plain values access decisions are made over: who is connected, who is calling, what was decided.

Frozen dataclasses with no web framework and no I/O, so the decision functions in ``rbac``,
``tokens`` and ``ratelimit`` can be called from an ASGI adapter, a command or a test alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from limits import RateLimitItem

__all__ = ["Charge", "Decision", "LimitPolicy", "PeerIdentity", "Principal", "PrincipalKind"]

PrincipalKind = Literal["person", "service", "certificate"]


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end of the connection, as its verified certificate says."""

    subject: str
    sans: tuple[str, ...]
    fingerprint_sha256: str
    source: str  # "tls" (verified by our handshake) or "xfcc" (asserted by a trusted proxy)
    serial: str = ""
    """The certificate's serial number, lowercase hex ("" when a proxy did not pass the certificate)."""
    issuer: str = ""
    """Its issuer (RFC 4514), which with the serial names it in a revocation list."""
    not_after: float = 0.0
    """When it expires (Unix time; 0: not known)."""

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"subject": self.subject, "sans": list(self.sans),
                                  "fingerprint_sha256": self.fingerprint_sha256, "source": self.source}
        if self.serial:
            out["serial"] = self.serial
        return out


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and how strongly they authenticated."""

    subject: str
    kind: PrincipalKind
    roles: frozenset[str]
    issuer: str | None = None
    client_id: str | None = None
    amr: tuple[str, ...] = ()
    acr: str | None = None
    auth_time: int | None = None
    token_id: str | None = None
    cert_bound: bool = False
    key: str = field(init=False, repr=False, compare=False)
    """What limits and budgets count against: the issuer (or kind) and the subject."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.issuer or self.kind}|{self.subject}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject, "kind": self.kind, "roles": sorted(self.roles), "issuer": self.issuer,
            "client_id": self.client_id, "amr": list(self.amr), "acr": self.acr, "auth_time": self.auth_time,
            "token_id": self.token_id, "cert_bound": self.cert_bound,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """An access decision and the rule (or the missing rule, or the step-up) behind it."""

    allowed: bool
    verb: str
    model: str | None
    rule: str | None
    reason: str
    step_up: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "verb": self.verb, "model": self.model, "rule": self.rule,
                "reason": self.reason, "step_up": self.step_up}


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """One policy of ``[limits]``: its name and its limits (``"10/second;500/hour"``)."""

    name: str
    items: tuple[RateLimitItem, ...]
    budget: bool = False
    """Budgets count in fixed windows (a day is a day), whatever the rate-limit strategy."""

    @classmethod
    def parse(cls, name: str, text: str, budget: bool = False) -> LimitPolicy | None:
        from limits import parse_many

        return cls(name, tuple(parse_many(text)), budget) if text else None


@dataclass(slots=True)  # not frozen: a frozen dataclass takes 3-4 times as long to build, per request
class Charge:
    """What one request owes one policy: ``cost`` under ``key``; cost 0 only asks that there is
    room for one (the failed-auth limit, tested before authentication and counted after a failure)."""

    policy: LimitPolicy | None
    key: str
    cost: int = 1
