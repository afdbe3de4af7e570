"""uvicorn's configuration with the gateway's own: the listener accepts plain TCP and
``HandshakeGuard`` starts TLS with the server context built here, rebuilt (at most once a second)
when a certificate revocation list changes; the revoked certificates and the lists' generation are
what a connection made before a change checks its certificate against at each request."""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

import uvicorn

from gateway.config import Config
from gateway.security.tls import (
    HANDSHAKES,
    ServerContext,
    build_server_context,
    revoked_certificates,
    tls_files_stamp,
)
from gateway.security.xfcc import TrustedProxies

__all__ = ["GatewayUvicornConfig"]

log = logging.getLogger("gateway.server")


class GatewayUvicornConfig(uvicorn.Config):
    """uvicorn's config with the gateway's: TLS is done by ``HandshakeGuard``, not by uvicorn."""

    def __init__(self, gateway_config: Config, max_connections: int, **kwargs: Any) -> None:
        self.gateway_config = gateway_config
        self.max_connections = max_connections
        self.tls_context: ServerContext | None = None
        self.revoked: frozenset[tuple[str, str]] = frozenset()
        self.tls_generation = 0
        """Counts the reloads of the CRLs: a connection made before one checks its certificate again."""
        self._tls_stamp: tuple[float, ...] = ()
        self._tls_checked = 0.0
        super().__init__(**kwargs)

    def load(self) -> None:
        super().load()
        self.tls_context = build_server_context(self.gateway_config.tls)
        self._tls_stamp = tls_files_stamp(self.gateway_config.tls)
        self._tls_checked = time.monotonic()
        self.ssl = None  # the listener accepts plain TCP; the guard starts TLS itself
        logging.getLogger("uvicorn.error").addFilter(self._tls_banner)
        s = self.gateway_config.server
        HANDSHAKES.max_connections = self.max_connections
        HANDSHAKES.max_pending = min(s.max_pending_handshakes, self.max_connections)
        HANDSHAKES.max_pending_per_address = s.max_pending_handshakes_per_address
        HANDSHAKES.max_per_address = s.max_connections_per_address
        HANDSHAKES.exempt = TrustedProxies(self.gateway_config.tls.trusted_proxies).trusts

    def _tls_banner(self, record: logging.LogRecord) -> bool:
        """uvicorn names the listener's scheme from its own TLS settings, which are off here: its
        "running on http://" line says https, as the listener does (a probe port stays http)."""
        args = record.args
        if (isinstance(record.msg, str) and record.msg.startswith("Uvicorn running on %s://")
                and isinstance(args, tuple) and len(args) == 3 and args[0] == "http" and args[2] == self.port):
            record.args = ("https", *args[1:])
        return True

    def current_tls_context(self) -> ServerContext:
        """The server context, built again (at most once a second) after a CRL file changed; a CRL
        that cannot be read keeps the previous context, and says so."""
        assert self.tls_context is not None
        now = time.monotonic()
        if self.gateway_config.tls.crl_files and now - self._tls_checked >= 1.0:
            self._tls_checked = now
            stamp = tls_files_stamp(self.gateway_config.tls)
            if stamp != self._tls_stamp:
                try:
                    self.tls_context = build_server_context(self.gateway_config.tls)
                    self.revoked = revoked_certificates(self.gateway_config.tls.crl_files)
                    self.tls_generation += 1
                    log.warning("certificate revocation lists reloaded: %s", ", ".join(self.gateway_config.tls.crl_files))
                except (OSError, ssl.SSLError, ValueError) as exc:
                    log.error("certificate revocation lists changed but cannot be loaded (%s); keeping the previous ones",
                              exc)
                self._tls_stamp = stamp
        return self.tls_context
