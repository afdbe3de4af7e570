"""What a verified client certificate alone brings: roles (``auth.certificate_roles``), and, where a
token is not required, a principal."""

from __future__ import annotations

from dataclasses import replace

from gateway.config import AuthConfig
from gateway.security.types import PeerIdentity, Principal

__all__ = ["certificate_principal", "certificate_roles", "with_roles"]


def certificate_roles(auth: AuthConfig, peer: PeerIdentity | None) -> frozenset[str]:
    """Roles ``auth.certificate_roles`` gives this client certificate (SAN or ``subject:``)."""
    if peer is None or not auth.certificate_roles:
        return frozenset()
    names = set(peer.sans) | {f"subject:{peer.subject}"}
    return frozenset(role for identity, roles in auth.certificate_roles if identity in names for role in roles)


def certificate_principal(peer: PeerIdentity, roles: frozenset[str]) -> Principal:
    """A principal for a certificate acting without a token (``auth.require_token = false``)."""
    uris = [s[4:] for s in peer.sans if s.startswith("URI:")]
    return Principal(subject=uris[0] if uris else peer.subject, kind="certificate", roles=roles)


def with_roles(principal: Principal, roles: frozenset[str]) -> Principal:
    return replace(principal, roles=principal.roles | roles) if roles else principal
