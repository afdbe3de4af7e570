"""TLS for the front door, and the identity a verified client certificate gives a connection.

Mozilla's "modern" profile by default: TLS 1.3 only. ``min_version = "1.2"`` (opt-in, reported
by the self-audit) adds TLS 1.2 restricted to ECDHE key exchange with AEAD ciphers
(Mozilla "intermediate" without DHE). https://wiki.mozilla.org/Security/Server_Side_TLS

mTLS is ``required`` by default: a client without a certificate, or with one not issued by the
configured client CA, fails the handshake and never reaches the application.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509

from gateway.config import TLSConfig

__all__ = ["HANDSHAKES", "PeerIdentity", "build_server_context", "identity_from_der"]

# TLS 1.2 suites allowed when it is switched on: ECDHE + AEAD only (no CBC, no RSA kex, no DHE).
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
_VERIFY = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "off": ssl.CERT_NONE}


HANDSHAKES = {"started": 0, "completed": 0}
"""Per process: ClientHellos seen, and handshakes that reached the HTTP protocol. The difference
(less the few in flight) is the handshakes that failed, which never reach the application."""


def _count_hello(ssl_object: object, server_name: str | None, context: ssl.SSLContext) -> None:
    HANDSHAKES["started"] += 1


def build_server_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if tls.min_version == "1.2":
        ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # Mozilla: let the client choose
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.sni_callback = _count_hello
    ctx.verify_mode = _VERIFY[tls.client_auth]
    if tls.client_auth != "off":
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end of the connection, as its verified certificate says."""

    subject: str
    sans: tuple[str, ...]
    fingerprint_sha256: str
    source: str  # "tls" (verified by our handshake) or "xfcc" (asserted by a trusted proxy)

    def as_dict(self) -> dict[str, object]:
        return {"subject": self.subject, "sans": list(self.sans),
                "fingerprint_sha256": self.fingerprint_sha256, "source": self.source}


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out = [f"DNS:{v}" for v in ext.get_values_for_type(x509.DNSName)]
    out += [f"URI:{v}" for v in ext.get_values_for_type(x509.UniformResourceIdentifier)]
    out += [f"email:{v}" for v in ext.get_values_for_type(x509.RFC822Name)]
    out += [f"IP:{v}" for v in ext.get_values_for_type(x509.IPAddress)]
    return tuple(out)


@lru_cache(maxsize=1024)
def identity_from_der(der: bytes) -> PeerIdentity:
    """Parse a verified client certificate once per distinct certificate."""
    cert = x509.load_der_x509_certificate(der)
    return PeerIdentity(
        subject=cert.subject.rfc4514_string(),
        sans=_sans(cert),
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
        source="tls",
    )
