"""The settings of identity: who may call (``[auth]``, ``[[auth.issuers]]``), the built-in issuer
(``[issuer]``) and what each role may do (``[rbac]``); ``gateway.config`` reads them with the rest."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ACR_MFA", "ACR_PASSWORD", "ALGORITHMS", "VERBS", "AuthConfig", "IssuerConfig", "IssuerTrust",
           "PolicyConfig", "RuleConfig", "StepUpRule"]

ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
"""The only JWS algorithms a token may use: no ``none``, no HMAC (a public key is no secret)."""
VERBS = ("infer", "metadata", "list", "explain", "metrics", "admin:models", "admin:audit", "admin:incident")
"""What a role can be granted; patterns such as ``admin:*`` or ``*`` expand to these."""
ACR_PASSWORD = "urn:gateway:acr:pwd"
ACR_MFA = "urn:gateway:acr:mfa"


@dataclass(frozen=True)
class IssuerTrust:
    """An external OpenID provider whose access tokens the gateway accepts (``[[auth.issuers]]``)."""

    issuer: str
    """The exact ``iss`` of its tokens."""
    jwks_uri: str = ""
    """Where its public keys are; "" finds them through OIDC discovery (``/.well-known/openid-configuration``)."""
    audience: str = ""
    """The ``aud`` its tokens must carry; "" means ``auth.audience``."""
    typ: str = "at+jwt"
    """Required JWS ``typ`` (RFC 9068); "" accepts any (reported by the self-audit)."""
    algorithms: tuple[str, ...] = ALGORITHMS
    roles_claims: tuple[str, ...] = ("roles",)
    """Claims that carry roles, dotted for nested ones (``realm_access.roles``); ``scope`` splits on spaces."""
    ca_file: str = ""
    """CA bundle for its HTTPS endpoints; "" uses the system's."""
    jwks_ttl_s: float = 3600.0
    """How long fetched keys are trusted without a successful refresh; past it, 503 until it answers."""
    jwks_refresh_s: float = 60.0
    """An unknown ``kid`` triggers a refetch at most this often."""
    require_cert_binding: bool = False
    """Refuse its tokens unless bound to the caller's client certificate (``cnf.x5t#S256``, RFC 8705)."""


@dataclass(frozen=True)
class AuthConfig:
    audience: str = ""
    """The ``aud`` access tokens must carry; "" means the built-in issuer's URL."""
    require_token: bool = True
    """false lets a client certificate listed in ``certificate_roles`` act without a token (reported)."""
    leeway_s: int = 30
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat`` (at most 300)."""
    issuers: tuple[IssuerTrust, ...] = ()
    certificate_roles: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Roles a verified client certificate brings: ``"URI:spiffe://..."`` or ``"subject:CN=..."`` → roles."""


@dataclass(frozen=True)
class IssuerConfig:
    """The built-in issuer (``[issuer]``): discovery, JWKS and a token endpoint served by the gateway."""

    enabled: bool = True
    url: str = ""
    """Its ``iss``; "" means ``https://localhost:<port>`` (or the listen address when not loopback)."""
    directory: str = "issuer"
    """Signing keys, clients and users (created by ``gateway init``; keep it private)."""
    incidents_file: str = ""
    """Where the incident controls in force persist (revocations, quarantine, lockdown); "" means
    ``incidents.json`` in ``directory`` (also when the issuer is off)."""
    token_ttl_s: int = 900
    max_failed_logins: int = 100
    """Failed secrets (a client's, a person's password) before the account is locked (NIST SP 800-63B
    allows at most 100); cleared by a right one."""
    max_failed_otp: int = 10
    """Wrong one-time codes before a person is locked; cleared only by a right code, never by a
    password-only sign-in."""
    lockout_s: int = 900
    sign_in_threads: int = 0
    """Token requests judged at once, each a ~50 ms, 16 MiB scrypt; more wait their turn, so a burst
    of sign-ins takes neither the memory nor every core that inference needs. 0: half the cores,
    at least one."""

    @property
    def incidents_path(self) -> str:
        return self.incidents_file or os.path.join(self.directory, "incidents.json")


@dataclass(frozen=True)
class RuleConfig:
    """``[[rbac.rules]]``: principals holding any of ``roles`` may perform ``verbs`` on ``models``."""

    name: str
    roles: tuple[str, ...]
    verbs: tuple[str, ...]
    models: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class StepUpRule:
    """``[[rbac.step_up]]``: how strongly a principal must have authenticated for these verbs/roles."""

    name: str
    verbs: tuple[str, ...] = ("*",)
    roles: tuple[str, ...] = ()
    """Applies only to principals holding one of these roles; empty means everyone."""
    amr_any: tuple[str, ...] = ()
    """At least one of these ``amr`` values (RFC 8176: ``mfa``, ``otp``, ``hwk``, ...)."""
    acr_min: str = ""
    """Lowest acceptable ``acr``, by its position in ``rbac.acr_order``."""
    max_age_s: int = 0
    """Most seconds since ``auth_time``; 0 means no limit."""


@dataclass(frozen=True)
class PolicyConfig:
    rules: tuple[RuleConfig, ...] = ()
    step_up: tuple[StepUpRule, ...] = ()
    acr_order: tuple[str, ...] = (ACR_PASSWORD, ACR_MFA)
    """``acr`` values from weakest to strongest."""
