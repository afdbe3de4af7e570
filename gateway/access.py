"""The thin adapter between a request's context and the access policy (``gateway.security.rbac``).

The policy decides over plain values; these two functions take the principal from the context,
record the decision in it (for the audit record), and raise the refusal.
"""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.errors import Unauthorized
from gateway.security.rbac import Policy
from gateway.security.types import Principal

__all__ = ["authorize", "principal_of"]


def principal_of(ctx: RequestContext) -> Principal:
    """The request's principal; 401 (no error code, RFC 6750 section 3.1) when it sent no credentials."""
    if ctx.principal is None:
        raise Unauthorized("this route needs a bearer token (Authorization: Bearer ...)", error=None)
    return ctx.principal


def authorize(ctx: RequestContext, policy: Policy, verb: str, model: str | None = None) -> Principal:
    """Decide, record the decision in the context, and raise the refusal if any."""
    principal = principal_of(ctx)
    ctx.decision = decision = policy.decide(principal, verb, model)
    if not decision.allowed:
        raise policy.refusal(principal, decision)
    return principal
