"""The gateway's error hierarchy, rendered as RFC 9457 problem details.

Every refusal the gateway makes is one of these, so every client sees one shape::

    GatewayError                     500  internal
    ├── BadRequest                   400  malformed JSON, tensors or headers
    │   └── UnsupportedEncoding      415
    ├── Unauthorized                 401  no, or an invalid, bearer token (WWW-Authenticate: Bearer)
    │   ├── StepUpRequired           401  valid token, too weak an authentication (RFC 9470)
    │   └── CredentialRevoked        401  the token, its principal or the client certificate was revoked
    ├── Forbidden                    403  authenticated, but the policy does not grant the verb
    ├── ExtractionSuspected          403  a model-extraction alarm blocks the principal (gateway.guards.watching)
    ├── NotFound                     404  unknown model or route (also: a model you may not see)
    ├── MethodNotAllowed             405
    ├── PayloadTooLarge              413
    ├── RequestTimeout               408  the request line, headers or body arrived too slowly
    ├── HeadersTooLarge              431
    ├── ClientClosedRequest          499  the client went away mid-request (nginx's convention)
    ├── InvalidInput                 422  well-formed but not what the model's signature accepts
    ├── TooManyRequests              429  throttled (Retry-After)
    ├── OAuthError                   4xx  the built-in issuer's refusals (RFC 6749 section 5.2 ``error``)
    ├── Unavailable                  503  no healthy worker, worker died mid-request (Retry-After)
    │   ├── Overloaded               503  too many connections or requests in flight on this process
    │   ├── LockedDown               503  an operator's lockdown: only break-glass principals are served
    │   └── ModelQuarantined         503  an operator quarantined this model version
    └── GatewayTimeout               504  the per-request deadline passed

On ``/v2`` routes the body also carries ``"error"`` (the Open Inference Protocol's error field,
which ``tritonclient`` reads to surface the message). ``render_problem`` is the one renderer: the
middleware, the issuer and the answers made below the application all use it.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway_client.protocol.errors import ProtocolError

__all__ = [
    "BadRequest",
    "bad_request",
    "ClientClosedRequest",
    "CredentialRevoked",
    "GatewayError",
    "GatewayTimeout",
    "HeadersTooLarge",
    "InvalidInput",
    "LockedDown",
    "MethodNotAllowed",
    "ModelQuarantined",
    "NotFound",
    "OAuthError",
    "Overloaded",
    "PayloadTooLarge",
    "RequestTimeout",
    "Unavailable",
    "Forbidden",
    "StepUpRequired",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedEncoding",
    "header_safe",
    "problem_body",
    "render_problem",
]

PROBLEM_BASE = "urn:gateway:problem:"


class GatewayError(Exception):
    """Base of every error the gateway answers with; renders itself as problem+json."""

    status: int = 500
    type: str = "internal"
    title: str = "Internal error"

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

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (a decoder process raises them): keep every attribute.
        return _restore, (type(self), self.detail, dict(self.__dict__))

    def to_problem(self, instance: str, request_id: str | None, oip: bool) -> dict[str, Any]:
        return problem_body(
            self.status, self.type, self.title, self.detail, instance, request_id, oip,
            self.extensions,
        )


def _restore(cls: type[GatewayError], detail: str, state: dict[str, Any]) -> GatewayError:
    error = cls.__new__(cls)
    Exception.__init__(error, detail)
    error.__dict__.update(state)
    return error


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


def header_safe(value: str) -> str:
    """A header value made of visible ASCII only: client-controlled text (a token's ``kid``, a
    model name) may reach a header, and anything else cannot be encoded or could split it."""
    return "".join(c if " " <= c <= "~" else "?" for c in value)


def render_problem(exc: GatewayError, instance: str, request_id: str | None, oip: bool,
                   debug: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of the problem document answering ``exc``.

    An internal error's detail (a 500 of no more specific kind) is replaced unless ``debug``.
    """
    detail_error = exc
    if exc.status >= 500 and type(exc).status == 500 and not debug:
        detail_error = type(exc)("internal error; quote the request id when reporting it")
    body = orjson.dumps(detail_error.to_problem(instance, request_id, oip))
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), header_safe(v).encode()) for k, v in exc.headers.items()]
    if request_id:
        headers.append((b"x-request-id", header_safe(request_id).encode()))
    if exc.status == 405 and "allow" in exc.extensions:
        headers.append((b"allow", header_safe(str(exc.extensions["allow"])).encode()))
    return exc.status, headers, body


class BadRequest(GatewayError):
    status = 400
    type = "bad-request"
    title = "Malformed request"


def bad_request(exc: ProtocolError) -> BadRequest:
    """The codec's error (the SDK's ``ProtocolError``) as the answer it gets: 400, with its fields."""
    return BadRequest(exc.detail, **exc.extensions)


class UnsupportedEncoding(BadRequest):
    status = 415
    type = "unsupported-media-type"
    title = "Unsupported content encoding or type"


def _quote(value: str) -> str:
    """An RFC 9110 quoted-string of visible ASCII, quotes and backslashes escaped."""
    return '"' + header_safe(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


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


class CredentialRevoked(Unauthorized):
    type = "credential-revoked"
    title = "Credentials revoked"


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


class RequestTimeout(GatewayError):
    status = 408
    type = "request-timeout"
    title = "Request timeout"


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


class Overloaded(Unavailable):
    type = "overloaded"
    title = "Too many requests in flight"


class LockedDown(Unavailable):
    type = "lockdown"
    title = "The gateway is locked down"


class ModelQuarantined(Unavailable):
    type = "model-quarantined"
    title = "This model version is quarantined"


class OAuthError(GatewayError):
    """A refusal of the built-in issuer's token endpoint: RFC 6749 section 5.2's ``error`` and
    ``error_description`` members inside the problem document."""

    title = "Token request refused"

    def __init__(self, status: int, error: str, description: str | None = None, *,
                 headers: dict[str, str] | None = None) -> None:
        description = description or error
        super().__init__(description, headers=headers, error=error, error_description=description)
        self.status = status
        self.type = "oauth-" + error.replace("_", "-")


class BadModelAnswer(GatewayError):
    """502: the model's worker answered outside the model's declared signature (a model the
    manifest misdescribes, or a compromised worker); nothing of the answer reaches the caller."""

    status = 502
    type = "bad-model-answer"
    title = "The model answered outside its signature"


class GatewayTimeout(GatewayError):
    status = 504
    type = "timeout"
    title = "Deadline exceeded"
