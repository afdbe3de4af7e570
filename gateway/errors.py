"""The gateway's error hierarchy, rendered as RFC 9457 problem details.

Every refusal the gateway makes is one of these, so every client sees one shape::

    GatewayError                     500  internal
    ├── BadRequest                   400  malformed JSON, tensors or headers
    │   └── UnsupportedEncoding      415
    ├── NotFound                     404  unknown model or route (also: a model you may not see)
    ├── MethodNotAllowed             405
    ├── PayloadTooLarge              413
    ├── HeadersTooLarge              431
    ├── ClientClosedRequest          499  the client went away mid-request (nginx's convention)
    ├── InvalidInput                 422  well-formed but not what the model's signature accepts
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
