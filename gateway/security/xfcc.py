"""``X-Forwarded-Client-Cert`` (Envoy's format) from trusted proxies only.

https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers#x-forwarded-client-cert

Behind an ingress that terminates mTLS, the client's certificate arrives as this header. It is
honoured only when the TCP peer is one of the configured trusted proxy addresses; from anyone
else it is ignored (and removed from the request) so it cannot be used to claim an identity.

Which element names the client: a proxy that *sets* the header (Envoy's ``SANITIZE_SET``) sends
one element; a proxy that *appends* (``APPEND_FORWARD``) adds its client's element after whatever
the client itself sent, so the first element is attacker-controlled. The gateway takes the element
``hops`` from the end (``tls.xfcc_hops``, default 1: the one the nearest trusted proxy added; 2
when two trusted proxies each append, and so on), which is right for both.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from gateway.security.types import PeerIdentity

__all__ = ["TrustedProxies", "parse_xfcc"]


class TrustedProxies:
    def __init__(self, networks: Iterable[str], hops: int = 1) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.hops = hops

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str | None) -> bool:
        if not host or not self.networks:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in n for n in self.networks)


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_xfcc(value: str, hops: int = 1) -> PeerIdentity | None:
    """The client's identity: the element ``hops`` from the end (added by the trusted proxies)."""
    elements = _split(value, ",")
    if hops < 1 or len(elements) < hops:
        return None
    fields: dict[str, list[str]] = {}
    for pair in _split(elements[-hops], ";"):
        key, sep, val = pair.partition("=")
        if sep:
            fields.setdefault(key.strip().lower(), []).append(val.strip().strip('"'))
    fingerprint = (fields.get("hash") or [""])[0].lower()
    subject = (fields.get("subject") or [""])[0]
    if not fingerprint or len(fingerprint) != 64:
        return None
    sans = tuple(f"DNS:{v}" for v in fields.get("dns", ())) + tuple(f"URI:{v}" for v in fields.get("uri", ()))
    return PeerIdentity(subject=subject, sans=sans, fingerprint_sha256=fingerprint, source="xfcc")
