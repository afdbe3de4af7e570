"""Reading request bodies: one size-limited reader (inference and the token endpoint both use it),
and a bound on the bytes of bodies held in flight, per principal and in all.

Without the second, a principal within its request rate could still make the gateway hold many
large bodies at once (each up to ``server.max_body_bytes``) by sending them slowly. A body is
claimed against ``server.max_inflight_body_bytes_per_principal`` and
``server.max_inflight_body_bytes`` before it is read (its ``Content-Length``) or as it arrives
(chunked), and released when the request ends: over the principal's share the answer is 429,
over the process's 503, both with ``Retry-After`` and before the body is read.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import Receive

from gateway.access import principal_of
from gateway.errors import (
    BadRequest,
    ClientClosedRequest,
    Overloaded,
    PayloadTooLarge,
    TooManyRequests,
    UnsupportedEncoding,
)
from gateway.stages.base import InferCall

__all__ = ["InFlightBytes", "ReadBody", "byte_count", "read_body"]


def byte_count(headers: Headers, name: str, max_digits: int = 15) -> int | None:
    """A header holding a byte count (ASCII digits only: ``"²".isdigit()`` is true), or None."""
    raw = headers.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > max_digits:
        raise BadRequest(f"{name} must be a byte count, got {raw[:32]!r}", field=name)
    return int(raw)


async def read_body(receive: Receive, headers: Headers, limit: int,
                    claim: Callable[[int], None] | None = None) -> bytes:
    """The whole body, refused (413) past ``limit`` by its ``Content-Length`` or as it streams;
    ``claim`` is told of each byte before it is kept (it may refuse)."""
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedEncoding(f"Content-Encoding {encoding[:32]!r} is not accepted; send identity")
    declared = byte_count(headers, "Content-Length")
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"the body may be at most {limit} bytes", limit=limit)
    if claim is not None and declared:
        claim(declared)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientClosedRequest("the client closed the connection before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # chunked bodies are counted as they stream
            raise PayloadTooLarge(f"the body may be at most {limit} bytes", limit=limit)
        if claim is not None and declared is None and chunk:
            claim(len(chunk))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class InFlightBytes:
    """Request-body bytes this process holds, per principal and in all."""

    def __init__(self, total: int, per_principal: int) -> None:
        self.limit_total = total
        self.limit_principal = per_principal
        self.total = 0
        self.by_principal: dict[str, int] = {}

    def claim(self, key: str, n: int) -> None:
        held = self.by_principal.get(key, 0)
        if held + n > self.limit_principal:
            raise TooManyRequests(f"this principal already has {held} bytes of request bodies in flight "
                                  f"(at most {self.limit_principal}); retry when they have been answered",
                                  retry_after=1, policy="inflight-body-bytes")
        if self.total + n > self.limit_total:
            raise Overloaded(f"the gateway holds {self.total} bytes of request bodies (at most "
                             f"{self.limit_total}); retry shortly", retry_after=1)
        self.by_principal[key] = held + n
        self.total += n

    def release(self, key: str, n: int) -> None:
        held = self.by_principal.get(key, 0) - n
        if held > 0:
            self.by_principal[key] = held
        else:
            self.by_principal.pop(key, None)
        self.total -= n


class ReadBody:
    name = "read-body"

    def __init__(self, limit: int, in_flight: InFlightBytes) -> None:
        self.limit = limit
        self.in_flight = in_flight

    async def __call__(self, call: InferCall) -> None:
        key = principal_of(call.ctx).key
        claimed = 0

        def claim(n: int) -> None:
            nonlocal claimed
            self.in_flight.claim(key, n)
            claimed += n

        call.cleanup.append(lambda: self.in_flight.release(key, claimed))
        call.body = await read_body(call.receive, call.headers, self.limit, claim)
