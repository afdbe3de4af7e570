"""A request to the built-in issuer's token endpoint, apart from the grants: its form as authlib
reads it, the client it claims before it is authenticated (RFC 6749 section 2.3), what its
factors turned out to be, and which lockout counters that outcome clears or adds to."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from authlib.oauth2.rfc6749 import OAuth2Payload, OAuth2Request

__all__ = ["Outcome", "TokenRequest", "claimed_client_id", "locked_answer", "verdicts_of"]


class _Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, form: dict[str, str]) -> None:
        self._form = form

    @property
    def data(self) -> dict[str, str]:
        return self._form

    @property
    def datalist(self) -> dict[str, list[str]]:
        return {k: [v] for k, v in self._form.items()}


@dataclass
class Outcome:
    """Which factors of a person's sign-in were right (None: not tried)."""

    password: bool | None = None
    otp: bool | None = None
    trying_otp: bool = False
    """The code took a place among its account's attempts (``Limiter.account_attempt``)."""
    locked: int = 0
    """Seconds to wait, when the code could not take one;"""
    busy: bool = False
    """because its account's other attempts were being judged (not locked by failures)."""
    counted: bool = False
    """The refusal was counted against the address's failed-auth limit while it was judged."""


class TokenRequest(OAuth2Request):  # type: ignore[misc]
    def __init__(self, url: str, headers: Mapping[str, str], form: dict[str, str]) -> None:
        super().__init__("POST", url, headers=headers)
        self.payload = _Payload(form)
        self._form = form
        self.outcome = Outcome()

    @property
    def args(self) -> dict[str, str]:
        return {}

    @property
    def form(self) -> dict[str, str]:
        return self._form



def locked_answer(wait: int, busy: bool = False) -> tuple[int, Any, list[tuple[str, str]]]:
    why = ("other sign-ins to this account are being checked; try again in a second" if busy
           else "too many failed attempts; this account is locked for now")
    return 429, {"error": "invalid_grant", "error_description": why}, [("Retry-After", str(wait))]


def _basic_credentials(request: TokenRequest) -> tuple[str, str] | None:
    """The client id and secret of an ``Authorization: Basic`` header (RFC 6749 section 2.3.1:
    form-encoded, then base64); ``ValueError`` when it is not that."""
    auth = request.headers.get("authorization", "")
    if auth[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the Basic credentials are not base64 of UTF-8 text") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise ValueError("the Basic credentials are not client_id:client_secret")
    return unquote(client_id), unquote(secret)


def claimed_client_id(request: TokenRequest) -> str:
    """The client id a request claims (Basic header or form), before it is authenticated;
    ``ValueError`` when its authentication is malformed or ambiguous."""
    basic = _basic_credentials(request)
    if basic is None:
        return request.form.get("client_id", "?")
    if "client_secret" in request.form or request.form.get("client_id", basic[0]) != basic[0]:
        raise ValueError("the client authenticates in more than one way (Basic and the form); use one "
                         "(RFC 6749 section 2.3)")
    return basic[0]


def verdicts_of(counters: dict[str, tuple[str, int]], person: Outcome, status: int) -> dict[str, bool | None]:
    """Which counters a token request's result clears (True) or adds to (False): a person's by
    factor, each only by its own; a client's by the answer (not by a lockout or an error of ours)."""
    if "password" in counters:
        return {"password": status == 200 if person.password is None else person.password, "otp": person.otp}
    return {"client": status == 200 if status in (200, 400, 401) else None}
