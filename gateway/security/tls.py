"""TLS for the front door, and the identity a verified client certificate gives a connection.

Mozilla's "modern" profile by default: TLS 1.3 only. ``min_version = "1.2"`` (opt-in, reported
by the self-audit) adds TLS 1.2 restricted to ECDHE key exchange with AEAD ciphers
(Mozilla "intermediate" without DHE). https://wiki.mozilla.org/Security/Server_Side_TLS

mTLS is ``required`` by default: a client without a certificate, or with one not issued by the
configured client CA, fails the handshake and never reaches the application.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import TLSConfig
from gateway.security.types import PeerIdentity

__all__ = ["HANDSHAKES", "HandshakeLedger", "build_server_context", "identity_from_der"]

# TLS 1.2 suites allowed when it is switched on: ECDHE + AEAD only (no CBC, no RSA kex, no DHE).
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
_VERIFY = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "off": ssl.CERT_NONE}


class HandshakeLedger:
    """Per serving process: connections still in their TLS handshake, by client address, and the
    handshakes that failed or were refused since the audit layer last collected them.

    ``admit`` decides whether a new connection may start a handshake at all: not past
    ``max_connections`` (established and pending together), ``max_pending`` pending in all,
    ``max_pending_per_address`` from one address, or ``max_per_address`` connections of any kind
    from one address (0: no such limit; addresses in ``exempt``, the trusted proxies, have none);
    the excess is closed at once, so idle or slow connections cannot exhaust the process's file
    descriptors, and one client's kept-alive connections cannot take every place under
    ``server.limit_concurrency``.
    """

    MAX_ADDRESSES = 1000
    """Addresses tracked per collection window; the rest are counted under ``"other"``."""

    def __init__(self, max_connections: int = 10_000, max_pending: int = 1024, max_pending_per_address: int = 256,
                 max_per_address: int = 0) -> None:
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.max_per_address = max_per_address
        self.exempt: Callable[[str], bool] = lambda address: False
        self.pending: dict[str, int] = {}
        self.total_pending = 0
        self.open: dict[str, int] = {}
        """address -> connections past their handshake and not yet closed."""
        self.failures: dict[str, dict[str, int]] = {}
        """address -> reason -> count, since the last ``collect``."""

    def admit(self, address: str, established: int) -> str | None:
        """None to go ahead (the handshake is then pending), else why the connection is refused."""
        if established + self.total_pending >= self.max_connections:
            why = "too many connections"
        elif self.total_pending >= self.max_pending:
            why = "too many handshakes in progress"
        elif self.pending.get(address, 0) >= self.max_pending_per_address:
            why = "too many handshakes in progress from this address"
        elif (self.max_per_address and self.open.get(address, 0) + self.pending.get(address, 0) >= self.max_per_address
              and not self.exempt(address)):
            why = "too many connections from this address"
        else:
            self.pending[address] = self.pending.get(address, 0) + 1
            self.total_pending += 1
            return None
        self._count(address, why)
        return why

    def finished(self, address: str, error: BaseException | None) -> None:
        left = self.pending.get(address, 1) - 1
        if left > 0:
            self.pending[address] = left
        else:
            self.pending.pop(address, None)
        self.total_pending -= 1
        if error is not None:
            self._count(address, handshake_failure(error))

    def opened(self, address: str) -> None:
        """A connection from ``address`` finished its handshake (until ``closed``)."""
        self.open[address] = self.open.get(address, 0) + 1

    def closed(self, address: str) -> None:
        left = self.open.get(address, 1) - 1
        if left > 0:
            self.open[address] = left
        else:
            self.open.pop(address, None)

    def _count(self, address: str, reason: str) -> None:
        if address not in self.failures and len(self.failures) >= self.MAX_ADDRESSES:
            address = "other"
        by_reason = self.failures.setdefault(address, {})
        by_reason[reason] = by_reason.get(reason, 0) + 1

    def collect(self) -> dict[str, dict[str, int]]:
        """The failures and refusals since the last call, by address and reason."""
        out, self.failures = self.failures, {}
        return out


def handshake_failure(error: BaseException) -> str:
    """A short, stable reason for a failed handshake (no client-chosen text)."""
    if isinstance(error, ssl.SSLError):
        return str(error.reason or type(error).__name__).lower()[:80]
    if isinstance(error, (TimeoutError, ConnectionAbortedError)):
        return "handshake timeout"
    if isinstance(error, ConnectionError):
        return "connection closed during the handshake"
    return type(error).__name__


HANDSHAKES = HandshakeLedger()
"""This process's ledger: the HTTP server's handshake guard writes it, the audit layer reads it."""


class ServerContext(ssl.SSLContext):
    """An SSL context that remembers the outgoing buffer of the connection it last wrapped: when a
    handshake fails, the event loop's TLS protocol drops the connection without sending what
    OpenSSL wrote into that buffer, the alert that says why (``certificate_revoked``, ``unknown_ca``,
    ``certificate_required``); ``gateway.server.protocol`` sends it."""

    last_outgoing: ssl.MemoryBIO | None = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        self.last_outgoing = outgoing
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def build_server_context(tls: TLSConfig) -> ServerContext:
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if tls.min_version == "1.2":
        ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # Mozilla: let the client choose
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.verify_mode = _VERIFY[tls.client_auth]
    if tls.client_auth != "off":
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        if tls.crl_files:
            _load_crls(ctx, tls.crl_files)
    return ctx


def _read_crl(name: str) -> x509.CertificateRevocationList:
    data = Path(name).read_bytes()
    try:
        return x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise ssl.SSLError(f"{name}: not a certificate revocation list ({exc})") from None


def revoked_certificates(files: tuple[str, ...]) -> frozenset[tuple[str, str]]:
    """(issuer, serial in lowercase hex) of each certificate the CRLs revoke: what a connection made
    before a CRL changed is checked against (its handshake checked the CRLs of its time)."""
    return frozenset((crl.issuer.rfc4514_string(), format(entry.serial_number, "x"))
                     for crl in map(_read_crl, files) for entry in crl)


def _load_crls(ctx: ssl.SSLContext, files: tuple[str, ...]) -> None:
    """Each CRL (PEM or DER) into the context, and revocation checked for client certificates.
    OpenSSL reads CRLs only from a file of PEM blocks, so they go through a private temporary one."""
    pems = [_read_crl(name).public_bytes(serialization.Encoding.PEM) for name in files]
    with tempfile.NamedTemporaryFile(suffix=".pem") as bundle:
        bundle.write(b"".join(pems))
        bundle.flush()
        ctx.load_verify_locations(cafile=bundle.name)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def certificate_expiries(tls: TLSConfig) -> list[tuple[str, str, float]]:
    """(which, subject, expiry as Unix time) of the server certificate and the client CAs."""
    files = [("server", tls.cert_file)] + ([("client-ca", tls.client_ca_file)] if tls.client_auth != "off" else [])
    out = []
    for which, name in files:
        try:
            certs = x509.load_pem_x509_certificates(Path(name).read_bytes())
        except (OSError, ValueError):
            continue
        out += [(which, c.subject.rfc4514_string(), c.not_valid_after_utc.timestamp()) for c in certs]
    return out


def tls_files_stamp(tls: TLSConfig) -> tuple[float, ...]:
    """When the files a server context is built from last changed (a changed CRL means a rebuild)."""
    stamps = []
    for name in tls.crl_files:
        try:
            stamps.append(os.stat(name).st_mtime)
        except OSError:
            stamps.append(-1.0)
    return tuple(stamps)


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
        serial=format(cert.serial_number, "x"),
        issuer=cert.issuer.rfc4514_string(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )
