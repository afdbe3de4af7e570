"""The built-in issuer's HTTP endpoints: the token endpoint, its keys and its metadata.

A thin adapter over ``gateway.security.issuer.BuiltinIssuer``: it reads the form with the shared
size-limited reader, hands it to the issuer, and renders a refusal as a problem document that
carries RFC 6749 section 5.2's ``error`` members (``OAuthError``).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.context import get_context
from gateway.errors import BadRequest, OAuthError, UnsupportedEncoding
from gateway.security.issuer import TOKEN_PATH, BuiltinIssuer
from gateway.security.tokens import cert_thumbprint
from gateway.stages.body import read_body

__all__ = ["MAX_FORM_BYTES", "IssuerEndpoints"]

MAX_FORM_BYTES = 16 * 1024


class IssuerEndpoints:
    def __init__(self, issuer: BuiltinIssuer) -> None:
        self.issuer = issuer
        self._metadata = orjson.dumps(issuer.metadata())

    async def token(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise UnsupportedEncoding("the token endpoint takes application/x-www-form-urlencoded")
        body = await read_body(request.receive, request.headers, MAX_FORM_BYTES)
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body),
                              max_num_fields=32)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the form body is not valid application/x-www-form-urlencoded") from None
        form = dict(pairs)
        if len(form) != len(pairs):
            raise BadRequest("a parameter appears more than once (RFC 6749 section 3.2)")
        ctx = get_context(request.scope)
        peer = ctx.peer
        incidents = self.issuer.incidents
        if incidents is not None and incidents.controls.refusal(None, peer) is not None:
            raise OAuthError(400, "invalid_grant", "the client certificate is revoked")
        ctx.failed_auth_counted = True  # from here the issuer counts its refusals against the address
        status, payload, headers = await self.issuer.respond(self.issuer.url + TOKEN_PATH, request.headers, form,
                                                             cert_thumbprint(peer) if peer else None,
                                                             ctx.client_host or "unknown")
        out = {k: v for k, v in headers if k.lower() != "content-type"}
        out["Cache-Control"] = "no-store"
        if status >= 400:
            body_doc = payload if isinstance(payload, dict) else {}
            raise OAuthError(status, str(body_doc.get("error", "invalid_request")),
                             str(body_doc.get("error_description", "")) or None, headers=out)
        return Response(orjson.dumps(payload), headers=out, media_type="application/json")

    async def jwks(self, request: Request) -> Response:
        return Response(orjson.dumps(self.issuer.store.jwks()), media_type="application/jwk-set+json",
                        headers={"Cache-Control": "max-age=300"})

    async def discovery(self, request: Request) -> Response:
        return Response(self._metadata, media_type="application/json")
