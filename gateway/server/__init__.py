"""Serving: the HTTP protocol and its TLS handshake guard (``protocol``), uvicorn's configuration
with the server context (``uvconfig``), serving processes (``processes``), and start-up, reload
and shutdown (``serve``)."""

from gateway.server.protocol import HandshakeGuard, TLSHttpToolsProtocol
from gateway.server.serve import serve
from gateway.server.uvconfig import GatewayUvicornConfig

__all__ = ["GatewayUvicornConfig", "HandshakeGuard", "TLSHttpToolsProtocol", "serve"]
