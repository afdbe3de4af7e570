"""Per-request state: one typed object under one namespaced scope key."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.security.tls import PeerIdentity

if TYPE_CHECKING:
    from gateway.security.rbac import Decision
    from gateway.security.tokens import Principal

__all__ = ["SCOPE_KEY", "RequestContext", "get_context"]

SCOPE_KEY = "gateway.context"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float
    deadline: float
    client_host: str | None
    peer: PeerIdentity | None
    model: str | None = None
    principal: Principal | None = None
    """Set by the authentication middleware; None when the request carried no credentials."""
    decision: Decision | None = None
    """The access decision, with the rule behind it, once a handler has asked for one."""
    extra: dict[str, Any] = field(default_factory=dict)


def get_context(scope: MutableMapping[str, Any]) -> RequestContext:
    ctx: RequestContext = scope[SCOPE_KEY]
    return ctx
