"""The gateway's error hierarchy, rendered as RFC 9457 problem details.

Every refusal the gateway makes is one of these, so every client sees one shape::

    GatewayError                     500  internal
    ├── BadRequest                   400  malformed JSON, tensors or headers
    │   └── UnsupportedEncoding      415
    ├── Unauthorized                 401  no, or an invalid, bearer token (WWW-Authenticate: Bearer)
    │   └── StepUpRequired           401  valid token, too weak an authentication (RFC 9470)
    ├── Forbidden                    403  authenticated, but the policy does not grant the verb
    ├── NotFound                     404  unknown model or route (also: a model you may not see)
    ├── MethodNotAllowed             405
    ├── PayloadTooLarge              413
    ├── HeadersTooLarge              431
    ├── ClientClosedRequest          499  the client went away mid-request (nginx's convention)
    ├── InvalidInput                 422  well-formed but not what the model's signature accepts
    ├── TooManyRequests              429  throttled (Retry-After)
    ├── Unavailable                  503  no healthy worker, worker died mid-request (Retry-After)
    └── GatewayTimeout               504  the per-request deadline passed

On ``/v2`` routes the body also carries ``"error"`` (the Open Inference Protocol's error field,
which ``tritonclient`` reads to surface the message).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BadRequest",
    "ClientClosedRequest",
    "GatewayError",
    "GatewayTimeout",
    "HeadersTooLarge",
    "InvalidInput",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "Unavailable",
    "Forbidden",
    "StepUpRequired",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedEncoding",
    "problem_body",
]

PROBLEM_BASE = "urn:gateway:problem:"


class GatewayError(Exception):
    """Base of every error the gateway answers with; renders itself as problem+json."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extensions = extensions
        super().__init__(self.detail)

    def to_problem(self, instance: str, request_id: str | None, oip: bool) -> dict[str, Any]:
        return problem_body(
            self.status, self.type, self.title, self.detail, instance, request_id, oip,
            self.extensions,
        )


def problem_body(
    status: int,
    type_: str,
    title: str,
    detail: str,
    instance: str,
    request_id: str | None,
    oip: bool,
    extensions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + type_,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if request_id:
        body["request_id"] = request_id
    if extensions:
        body.update(extensions)
    if oip:
        body["error"] = detail
    return body


class BadRequest(GatewayError):
    status = 400
    type = "bad-request"
    title = "Malformed request"


class UnsupportedEncoding(BadRequest):
    status = 415
    type = "unsupported-media-type"
    title = "Unsupported content encoding or type"


def _quote(value: str) -> str:
    """An RFC 9110 quoted-string: no control characters, quotes and backslashes escaped."""
    cleaned = "".join(c for c in value if c >= " " and c != "\x7f")
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bearer_challenge(error: str | None, description: str | None = None, **params: str) -> str:
    """``WWW-Authenticate: Bearer ...`` (RFC 6750 section 3; RFC 9470 adds acr_values and max_age)."""
    parts = ['realm="gateway"']
    if error:
        parts.append(f"error={_quote(error)}")
    if description:
        parts.append(f"error_description={_quote(description)}")
    parts += [f"{k}={_quote(v)}" for k, v in params.items()]
    return "Bearer " + ", ".join(parts)


class Unauthorized(GatewayError):
    """401. ``error`` is RFC 6750's code; None for a request that carried no credentials at all."""

    status = 401
    type = "unauthorized"
    title = "Authentication required"

    def __init__(self, detail: str | None = None, *, error: str | None = "invalid_token", **extensions: Any) -> None:
        super().__init__(detail, **extensions)
        self.headers["WWW-Authenticate"] = bearer_challenge(error, detail if error else None)


class StepUpRequired(GatewayError):
    """401 ``insufficient_user_authentication`` with what would satisfy the policy (RFC 9470)."""

    status = 401
    type = "step-up-required"
    title = "Stronger authentication required"

    def __init__(self, detail: str, *, acr_values: str = "", max_age: int | None = None) -> None:
        extensions: dict[str, Any] = {}
        params = {}
        if acr_values:
            params["acr_values"] = extensions["acr_values"] = acr_values
        if max_age is not None:
            params["max_age"] = str(max_age)
            extensions["max_age"] = max_age
        super().__init__(detail, **extensions)
        self.headers["WWW-Authenticate"] = bearer_challenge("insufficient_user_authentication", detail, **params)


class Forbidden(GatewayError):
    status = 403
    type = "forbidden"
    title = "Forbidden"

    def __init__(self, detail: str | None = None, **extensions: Any) -> None:
        super().__init__(detail, **extensions)
        self.headers["WWW-Authenticate"] = bearer_challenge("insufficient_scope", self.detail)


class TooManyRequests(GatewayError):
    status = 429
    type = "too-many-requests"
    title = "Too many requests"

    def __init__(self, detail: str | None = None, *, retry_after: int, **extensions: Any) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))}, **extensions)


class NotFound(GatewayError):
    status = 404
    type = "not-found"
    title = "Not found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "method-not-allowed"
    title = "Method not allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "payload-too-large"
    title = "Request body too large"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "headers-too-large"
    title = "Request headers too large"


class ClientClosedRequest(GatewayError):
    status = 499
    type = "client-closed-request"
    title = "Client closed the request"


class InvalidInput(GatewayError):
    status = 422
    type = "invalid-input"
    title = "Input does not match the model's signature"


class Unavailable(GatewayError):
    status = 503
    type = "unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1, **extensions: Any) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, **extensions)


class GatewayTimeout(GatewayError):
    status = 504
    type = "timeout"
    title = "Deadline exceeded"
