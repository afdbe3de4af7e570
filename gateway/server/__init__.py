"""Serving: the HTTP protocol and its TLS handshake guard (``protocol``), serving processes
(``processes``), and start-up, reload and shutdown (``serve``)."""

from gateway.server.protocol import GatewayUvicornConfig, HandshakeGuard, TLSHttpToolsProtocol
from gateway.server.serve import serve

__all__ = ["GatewayUvicornConfig", "HandshakeGuard", "TLSHttpToolsProtocol", "serve"]
