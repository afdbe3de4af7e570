"""Typed exceptions, built from the gateway's RFC 9457 problem documents."""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError", "BudgetExhausted", "ClientError", "ConnectionFailed", "Forbidden", "GatewayError",
    "InvalidInput", "NotFound", "RateLimited", "StepUpRequired", "Timeout", "Unavailable", "from_response",
]


class ClientError(Exception):
    """Base of everything this SDK raises."""


class GatewayError(ClientError):
    """The gateway refused or failed a request; ``problem`` is its problem document."""

    def __init__(self, status: int, problem: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.problem = problem
        self.headers = headers or {}
        self.type = str(problem.get("type", ""))
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", problem.get("error", "")))
        self.request_id = problem.get("request_id") or self.headers.get("x-request-id")
        super().__init__(f"{status} {self.title}: {self.detail}" + (f" (request {self.request_id})" if self.request_id else ""))


class AuthenticationError(GatewayError):
    """401: no token, or one the gateway does not accept (``invalid_token``)."""


class StepUpRequired(AuthenticationError):
    """401 ``insufficient_user_authentication``: sign in again, more strongly (RFC 9470)."""

    @property
    def acr_values(self) -> str:
        return str(self.problem.get("acr_values", ""))

    @property
    def max_age(self) -> int | None:
        value = self.problem.get("max_age")
        return int(value) if value is not None else None


class Forbidden(GatewayError):
    """403: authenticated, but the policy does not grant this."""


class NotFound(GatewayError):
    """404: no such model or version, or one this principal may not use."""


class InvalidInput(GatewayError):
    """400 or 422: the request or its tensors are not what the gateway or the model accepts."""

    @property
    def field(self) -> str | None:
        value = self.problem.get("field")
        return str(value) if value is not None else None


class AdversarialInputRefused(InvalidInput):
    """422 ``adversarial-input``: the model's guard judged the input adversarial or anomalous."""

    @property
    def technique(self) -> str | None:
        """The MITRE ATLAS technique the detection is filed under (AML.T0043, AML.T0015)."""
        value = self.problem.get("technique")
        return str(value) if value is not None else None


class _RetryAfter(GatewayError):
    @property
    def retry_after(self) -> float:
        """Seconds the gateway asked the caller to wait (``Retry-After``)."""
        try:
            return float(self.headers.get("retry-after", "1"))
        except ValueError:
            return 1.0


class RateLimited(_RetryAfter):
    """429: a rate limit; ``retry_after`` says when to try again."""

    @property
    def policy(self) -> str | None:
        value = self.problem.get("policy")
        return str(value) if value is not None else None


class BudgetExhausted(RateLimited):
    """429 ``budget-exhausted``: this principal's query budget for the model is used up until ``reset``."""

    @property
    def reset(self) -> str | None:
        value = self.problem.get("reset")
        return str(value) if value is not None else None


class Unavailable(_RetryAfter):
    """503: no healthy worker, the audit log cannot be written, a dependency is down."""


class Timeout(ClientError):
    """The call's deadline passed (the gateway's 504, or the client's own ``deadline_s``)."""


class ConnectionFailed(ClientError):
    """No connection to the gateway could be made (after the retries the deadline allowed)."""


def from_response(status: int, problem: dict[str, Any], headers: dict[str, str]) -> ClientError:
    kind = str(problem.get("type", "")).rsplit(":", 1)[-1]
    challenge = headers.get("www-authenticate", "")
    if status == 401:
        if kind == "step-up-required" or "insufficient_user_authentication" in challenge:
            return StepUpRequired(status, problem, headers)
        return AuthenticationError(status, problem, headers)
    if status == 403:
        return Forbidden(status, problem, headers)
    if status == 404:
        return NotFound(status, problem, headers)
    if status == 429:
        return (BudgetExhausted if kind == "budget-exhausted" else RateLimited)(status, problem, headers)
    if status == 503:
        return Unavailable(status, problem, headers)
    if status == 504:
        return Timeout(f"504: {problem.get('detail', 'deadline exceeded')}")
    if status == 422 and kind == "adversarial-input":
        return AdversarialInputRefused(status, problem, headers)
    if status in (400, 413, 415, 422, 431):
        return InvalidInput(status, problem, headers)
    return GatewayError(status, problem, headers)
