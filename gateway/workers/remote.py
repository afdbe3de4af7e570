"""Remote workers: a worker host serves its models over TCP with mutual TLS; the gateway reaches
them as endpoints.

**Worker host** (``gateway worker serve --config worker.toml``). The supervisor of ``gateway serve``
starts and watches the workers on Unix sockets, isolated as ever (their own users, no network, no
keys). ``WorkerFront`` listens on each model's ``listen`` address with TLS (the host's certificate,
``[tls]``), accepts only client certificates from ``[tls] client_ca_file`` that carry one of the
URI SANs of ``[worker_host] clients`` (the gateway's SPIFFE ID), and joins each accepted connection
to one of the model's workers, verified by its socket's peer credentials as the gateway verifies
a local one. Bytes pass through unchanged: binary tensors over HTTP/1.1 keep-alive. The TLS key
stays in the front; the process that parses tensors never holds it.

**Gateway** (``[models.NAME] endpoints = ["host:port", ...]``). ``TLSTransport`` is an
``HTTPTransport`` over TCP with the gateway's client certificate (``[remote_workers]``). It accepts
a worker host only when its certificate chains to ``[remote_workers] ca_file`` and carries a URI
SAN under ``[remote_workers] identity`` (``spiffe://<trust domain>/worker/``): the SPIFFE ID is
checked, not the host name (as X.509-SVIDs are). A host refused for its identity is logged once
per endpoint, not per request, and taken out of rotation like a worker that does not answer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson
from cryptography import x509

from gateway.workers.local import peer_credentials
from gateway.workers.transport import HTTPTransport, PeerCredentials, WorkerConnectError, WorkerImpostor, _Connection

__all__ = ["TLSTransport", "WorkerFront", "split_address", "uri_sans"]

log = logging.getLogger("gateway.remote")

HIGH_WATER = 1 << 20
"""Bytes queued towards one side before the other side's reading pauses."""


def uri_sans(der: bytes | None) -> list[str]:
    """The URI subject alternative names of a DER certificate (none when it has none)."""
    if not der:
        return []
    try:
        ext = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return []
    return [str(v) for v in ext.value.get_values_for_type(x509.UniformResourceIdentifier)]


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) into its parts; ``ValueError`` when it is not that."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


# -- the gateway's side --------------------------------------------------------------------------

def client_context(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext:
    """The gateway's TLS client context towards worker hosts: TLS 1.3, its own certificate, the
    workers' CA; the identity is checked by SPIFFE ID after the handshake, not by host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca_file)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class TLSTransport(HTTPTransport):
    """A remote worker host's model, over TCP with mutual TLS, verified by its SPIFFE ID."""

    def __init__(self, address: str, context: ssl.SSLContext, identity: str, max_connections: int = 256,
                 answers_in_flight: int = 0) -> None:
        super().__init__(address, max_connections, answers_in_flight)
        self.host, self.port = split_address(address)
        self.context = context
        self.identity = identity
        self._refusal: str | None = None  # the last identity refusal logged, so that it is logged once

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self.context,
                                                           ssl_handshake_timeout=5.0)
        except ssl.SSLCertVerificationError as exc:
            raise self._impostor(f"worker host {self.address} presented a certificate not from the workers' CA "
                                 f"({exc.verify_message})") from None
        except (OSError, TimeoutError) as exc:  # refused, unreachable, or a handshake that failed
            raise WorkerConnectError(f"cannot connect to worker host {self.address}: {exc}") from None
        sans = uri_sans(transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
        if not any(san.startswith(self.identity) for san in sans):
            transport.abort()
            raise self._impostor(f"worker host {self.address} is not a worker: its certificate names "
                                 f"{', '.join(sans) or 'no URI'}, not {self.identity}...")
        self._refusal = None
        return conn

    def _impostor(self, why: str) -> WorkerImpostor:
        if why != self._refusal:
            log.error("SECURITY: %s; nothing was sent to it", why)
            self._refusal = why
        return WorkerImpostor(why)


# -- the worker host's side ----------------------------------------------------------------------

def server_context(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca_file)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class _Side(asyncio.Protocol):
    """One end of a joined pair: what it receives is written to the other end."""

    def __init__(self, on_lost: Callable[[], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.closed = False
        self.on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_lost is not None:
            self.on_lost()
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def pause_writing(self) -> None:  # the other end reads slower than this one writes
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None and not self.other.closed:
            self.other.transport.resume_reading()


class _ClientSide(_Side):
    """A gateway's connection: its identity is checked, then it is joined to a worker."""

    def __init__(self, front: WorkerFront) -> None:
        super().__init__()
        self.front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.set_write_buffer_limits(HIGH_WATER)
        sans = uri_sans(transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
        if not any(san in self.front.clients for san in sans):
            self.front.refused(transport.get_extra_info("peername"), sans)
            self.transport.abort()
            return
        self.transport.pause_reading()  # until the worker is joined
        self.front.join(self)


class WorkerFront:
    """The TLS listener of one model on a worker host, joined to that model's local workers."""

    def __init__(self, model: str, address: str, context: ssl.SSLContext, clients: frozenset[str],
                 routes: Callable[[], list[dict[str, Any]]]) -> None:
        self.model = model
        self.address = address
        self.context = context
        self.clients = clients
        self.routes = routes
        """The model's workers as the supervisor last published them: socket, pid, uid."""
        self.active: dict[str, int] = {}
        self._refused: set[tuple[str, ...]] = set()
        self._server: asyncio.Server | None = None
        self._joins: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        host, port = split_address(self.address)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _ClientSide(self), host, port, ssl=self.context, ssl_handshake_timeout=5.0, backlog=1024)
        log.info("model %s served to gateways on %s", self.model, self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def refused(self, peer: Any, sans: list[str]) -> None:
        key = tuple(sans)
        if key not in self._refused:  # once per identity, not per connection
            self._refused.add(key)
            log.error("SECURITY: refused a client of %s from %s: its certificate names %s, not a gateway (%s)",
                      self.model, peer, ", ".join(sans) or "no URI", ", ".join(sorted(self.clients)))

    def join(self, client: _ClientSide) -> None:
        task = asyncio.get_running_loop().create_task(self._join(client))
        self._joins.add(task)
        task.add_done_callback(self._joins.discard)

    async def _join(self, client: _ClientSide) -> None:
        assert client.transport is not None
        workers = sorted(self.routes(), key=lambda w: self.active.get(str(w["socket"]), 0))
        for entry in workers:
            path = str(entry["socket"])

            def lost(path: str = path) -> None:
                self.active[path] = max(0, self.active.get(path, 1) - 1)

            try:
                transport, worker = await asyncio.get_running_loop().create_unix_connection(lambda: _Side(lost), path)
            except OSError:
                continue
            self.active[path] = self.active.get(path, 0) + 1
            expected = PeerCredentials(int(entry["pid"]), int(entry["uid"])) if entry.get("pid") else None
            if expected is not None and peer_credentials(transport.get_extra_info("socket")) != expected:
                log.error("SECURITY: %s is not listened on by the worker the supervisor started", path)
                transport.abort()
                continue
            if client.closed:
                transport.close()
                return
            worker.other, client.other = client, worker
            transport.set_write_buffer_limits(HIGH_WATER)
            client.transport.resume_reading()
            return
        log.warning("no worker of %s accepted a gateway's connection", self.model)
        client.transport.close()


def routes_reader(runtime_dir: Path) -> Callable[[str], list[dict[str, Any]]]:
    """The workers of a unit from the supervisor's ``routes.json``, read again when it changes."""
    path = runtime_dir / "routes.json"
    cache: dict[str, Any] = {"mtime": None, "models": {}}

    def workers(key: str) -> list[dict[str, Any]]:
        try:
            mtime = path.stat().st_mtime_ns
            if mtime != cache["mtime"]:
                cache["models"], cache["mtime"] = orjson.loads(path.read_bytes())["models"], mtime
        except (OSError, ValueError, KeyError):
            pass  # mid-replace: the last good copy
        route = cache["models"].get(key)
        return list(route["workers"]) if route else []

    return workers
