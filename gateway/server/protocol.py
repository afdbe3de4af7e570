"""The gateway's connections: a handshake guard in front of TLS, and the HTTP protocol behind it.

``HandshakeGuard`` is what uvicorn instantiates for each accepted TCP connection. Before any TLS
work it asks the process's ``HandshakeLedger`` whether the connection may start a handshake (caps
on connections, on handshakes in progress, and per client address); the excess is closed at once.
It then installs the event loop's own TLS protocol, with ``server.handshake_timeout_s``, exactly as
``create_server(ssl=...)`` would, so a connection that never completes its handshake holds its file
descriptor for seconds, not uvicorn's 60. The outcome of every handshake, with the client's
address, goes to the ledger, where the audit layer collects it.

``TLSHttpToolsProtocol`` is the HTTP protocol of each completed TLS connection. uvicorn verifies
nothing and does not hand the verified certificate to the application (the ASGI ``tls`` extension
is unmerged: uvicorn PRs 3132/3133), so it reads the peer certificate once per connection and puts
it into ``scope["extensions"]["tls"]``. It also bounds time: headers within
``server.header_timeout_s``, the body within ``server.body_timeout_s``, and answers that the client
does not read within ``server.write_timeout_s``. What it refuses itself (a malformed request, too
many or too large headers, headers too slow, too many requests in flight) it answers through the
application, with the refusal in ``scope[REFUSAL_KEY]``, so that the answer is the same problem
document as any other and the request has its audit record. uvicorn is pinned because this
subclasses its protocol (and uses uvloop's ``SSLProtocol``).
"""

from __future__ import annotations

import asyncio
import http
import logging
import ssl
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.context import REFUSAL_KEY, SCOPE_KEY
from gateway.errors import (
    BadRequest,
    CredentialRevoked,
    GatewayError,
    HeadersTooLarge,
    Overloaded,
    RequestTimeout,
    Unauthorized,
    header_safe,
    render_problem,
)
from gateway.httpserver import BufferedBodyProtocol
from gateway.security.tls import (
    HANDSHAKES,
    identity_from_der,
)
from gateway.server.uvconfig import GatewayUvicornConfig

__all__ = ["AlertingTransport", "GatewayUvicornConfig", "HandshakeGuard", "TLSHttpToolsProtocol"]

log = logging.getLogger("gateway.server")

MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024  # Envoy's edge default buffer per connection
MAX_HEAD_BYTES = 64 * 1024
"""The request line and headers as sent (Envoy's max_request_headers_kb is 60)."""


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    try:
        import uvloop.loop

        if isinstance(loop, uvloop.Loop):
            return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we serve from
        pass
    from asyncio.sslproto import SSLProtocol

    return SSLProtocol


class HandshakeGuard(asyncio.Protocol):
    def __init__(self, config: GatewayUvicornConfig, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "unknown"
        refused = HANDSHAKES.admit(address, len(self.server_state.connections))
        if refused is not None:
            transport.abort()
            return
        context = self.config.current_tls_context()
        http = TLSHttpToolsProtocol(config=self.config, server_state=self.server_state, app_state=self.app_state,
                                    _loop=self.loop)
        waiter = self.loop.create_future()
        # In this same call, before the first byte can be read: the loop's own TLS protocol with our
        # handshake timeout (what ``create_server(ssl=...)`` does, minus its 60 s default).
        tls = _ssl_protocol_class(self.loop)(
            self.loop, http, context, waiter, True, None,
            ssl_handshake_timeout=self.config.gateway_config.server.handshake_timeout_s)
        transport.set_protocol(tls)
        alerting = AlertingTransport(transport, self.loop)
        tls.connection_made(alerting)
        alerting.outgoing = context.last_outgoing  # this connection's (wrapped in connection_made)
        waiter.add_done_callback(alerting.handshake_done)
        waiter.add_done_callback(lambda done: HANDSHAKES.finished(
            address, None if done.cancelled() else done.exception()))


class AlertingTransport:
    """The TCP transport as the TLS protocol sees it, so that a failed handshake's alert is sent.

    On a failed handshake the TLS protocol force-closes the transport with the alert still in its
    outgoing buffer: the client sees the connection reset with no reason. Here that close sends
    the alert first, then half-closes and keeps reading (and dropping) whatever the client had
    already sent for up to ``LINGER_S``, so that a reset does not overtake the alert. Everything
    else passes to the real transport."""

    LINGER_S = 1.0

    def __init__(self, real: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.real = real
        self.loop = loop
        self.outgoing: ssl.MemoryBIO | None = None

    def handshake_done(self, done: asyncio.Future[None]) -> None:
        if done.cancelled() or done.exception() is None:
            self.outgoing = None  # from here on a forced close is what it says

    def _force_close(self, exc: BaseException | None) -> None:
        alert = self.outgoing.read() if self.outgoing is not None else b""
        self.outgoing = None
        if not alert or self.real.is_closing():
            self.real._force_close(exc)  # type: ignore[attr-defined]
            return
        # The TLS protocol stays the transport's protocol (swapping it inside its own read callback
        # is not safe): after a failed handshake it drops what it receives.
        self.real.write(alert)
        if self.real.can_write_eof():
            self.real.write_eof()
        self.loop.call_later(self.LINGER_S, self.real.abort)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class TLSHttpToolsProtocol(BufferedBodyProtocol):
    _tls_extension: Any = None
    _address = "unknown"  # the client's, counted in HANDSHAKES while the connection is open
    _timer: asyncio.TimerHandle | None = None
    _armed: tuple[float, str] | None = None  # the timer's seconds and what it times
    _suspended: tuple[float, str, int] | None = None  # ... stopped while requests are held back
    _completed = 0  # requests parsed on this connection
    _write_timer: asyncio.TimerHandle | None = None
    _refusing = False
    _header_bytes = _header_count = _hosts = 0
    _in_trailers = False
    _tls_generation = 0
    _in_head = True  # reading a request's line and headers (the first, or the next after one ends)
    _head_bytes = 0
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    write_timeout_s = 30.0

    # -- timers -----------------------------------------------------------------------------------
    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._armed = (seconds, what)
        self._timer = self.loop.call_later(seconds, self._too_slow, what, seconds)

    def _disarm(self) -> None:
        self._armed = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def hold_started(self) -> None:
        """Pipelined requests wait for earlier ones to be answered: the wait is this process's, not
        the client's, so the clock on the request being read stops until parsing goes on."""
        if self._armed is not None:
            self._suspended = (*self._armed, self._completed)
        self._disarm()

    def hold_ended(self) -> None:
        suspended, self._suspended = self._suspended, None
        if suspended is not None and self._timer is None and suspended[2] == self._completed:
            self._arm(suspended[0], suspended[1])  # that request is still being read: its clock again

    def _too_slow(self, what: str, seconds: float) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        error = RequestTimeout(f"the request {what} did not arrive within {seconds:g} s")
        log.info("closing a connection from %s: request %s slower than %g s", self.client, what, seconds)
        if self.cycle is None or self.cycle.response_complete:
            self._refuse(error)  # nothing of this request reached the application yet
            return
        # The application is waiting for the body: it records the refusal (it finds it in the
        # scope when the connection closes under it); the client gets it here, now.
        self.scope[REFUSAL_KEY] = error  # type: ignore[literal-required]
        if not self.cycle.response_started:
            ctx = self.scope.get(SCOPE_KEY)
            self._write_answer(*render_problem(error, self.scope.get("path", ""),
                                               getattr(ctx, "request_id", None), True))
        self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        log.info("closing a connection from %s: it read none of its answers for %g s", self.client,
                 self.write_timeout_s)
        self.transport.abort()

    # -- connection -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = str(self.client[0]) if self.client else "unknown"  # as HandshakeGuard names it
        HANDSHAKES.opened(self._address)
        gateway_config = getattr(self.config, "gateway_config", None)
        if gateway_config is not None:
            s = gateway_config.server
            self.header_timeout_s, self.body_timeout_s, self.write_timeout_s = (
                s.header_timeout_s, s.body_timeout_s, s.write_timeout_s)
        self._arm(self.header_timeout_s, "headers")
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        if isinstance(self.config, GatewayUvicornConfig):
            self._tls_generation = self.config.tls_generation
        der = ssl_object.getpeercert(binary_form=True)
        self._tls_extension = {
            "client_cert_der": der,
            "client_identity": identity_from_der(der) if der else None,
            "tls_version": ssl_object.version(),
            "cipher": (ssl_object.cipher() or ("",))[0],
        }

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
        HANDSHAKES.closed(self._address)
        super().connection_lost(exc)

    def feed(self, piece: bytes) -> None:
        """The parser gets at most ``MAX_HEAD_BYTES`` of a request's line and headers: it holds a
        header value (and uvicorn the URL) whole until it ends, so one long one would grow this
        process by whatever the client sends before ``header_timeout_s``. Pieces come at most
        ``HEAD_PIECE`` bytes long while a head is read."""
        if self._refusing:  # after a refusal, whatever else the client sends is not read
            return
        if self._in_head:
            if self._head_bytes >= MAX_HEAD_BYTES:
                self._refuse(HeadersTooLarge(f"the request line and headers may be at most {MAX_HEAD_BYTES} bytes"))
                return
            self._head_bytes += len(piece)
        super().feed(piece)

    # -- parser callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s, "headers")
        self._header_bytes = self._header_count = self._hosts = 0
        self._in_trailers = False
        if self._tls_extension is not None:
            self.scope["extensions"] = {"tls": self._tls_extension}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        self._header_count += 1
        if self._header_count > MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(HeadersTooLarge(
                f"at most {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes of headers are accepted"))
            # Stop the parser: httptools surfaces this as a parse error, which we then ignore.
            raise ValueError("headers too large")
        if self._in_trailers:
            # A chunked body's trailer fields: uvicorn would append them to the headers the
            # application reads after the body, so a client (or anything a proxy forwards
            # unexamined) could add an Authorization or an X-Forwarded-Client-Cert there. Counted
            # against the limits above, then dropped (RFC 9110 section 6.5.1).
            return
        if len(name) == 4 and name.lower() == b"host":
            self._hosts += 1
        elif len(name) == 14 and name.lower() == b"content-length":
            self.declare_length(value)
        # uvicorn's, past BufferedBodyProtocol's, which would only look for the content length again
        HttpToolsProtocol.on_header(self, name, value)

    def on_headers_complete(self) -> None:
        self._in_trailers = True
        self._in_head = False
        self._arm(self.body_timeout_s, "body")
        invalid = self._certificate_now_invalid()
        if self._hosts != 1 and self.parser.get_http_version() == "1.1":
            # RFC 9112 section 3.2: a proxy in front and this server could each take another one
            invalid = BadRequest(f"an HTTP/1.1 request carries exactly one Host header, not {self._hosts}")
        if invalid is not None:  # answered through the application, then the connection closes
            self.scope[REFUSAL_KEY] = invalid  # type: ignore[literal-required]
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            # uvicorn would answer plain text below the application; ours answers (and records) it.
            overloaded = Overloaded(f"this process has {len(self.connections)} connections and {len(self.tasks)} "
                                    f"requests in flight (at most {limit} of either); retry shortly", retry_after=1)
            self.scope[REFUSAL_KEY] = overloaded  # type: ignore[literal-required]
        self.limit_concurrency = None
        try:
            super().on_headers_complete()
        finally:
            self.limit_concurrency = limit
        if invalid is not None:
            self.cycle.keep_alive = False

    def _certificate_now_invalid(self) -> GatewayError | None:
        """The client certificate's handshake was good; a keep-alive connection may outlive its
        expiry, or a CRL that revokes it. Checked at each request (a comparison, and a look at the
        CRL files at most once a second)."""
        identity = self._tls_extension.get("client_identity") if self._tls_extension else None
        if identity is None:
            return None
        if identity.not_after and time.time() > identity.not_after:
            return Unauthorized("the client certificate expired during this connection; connect again with a "
                                "current one", error=None)
        config = self.config
        if isinstance(config, GatewayUvicornConfig):
            config.current_tls_context()
            if (config.tls_generation != self._tls_generation
                    and (identity.issuer, identity.serial) in config.revoked):
                return CredentialRevoked("the client certificate was revoked after this connection was made")
        return None

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head, self._head_bytes = True, 0
        self._completed += 1
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(BadRequest(f"malformed HTTP request: {msg}"))

    # -- refusals below the application -------------------------------------------------------------
    def _refuse(self, error: GatewayError) -> None:
        """Answer ``error`` through the application (rendered and recorded there), then close."""
        if self._refusing or self.transport.is_closing():
            return
        self._refusing = True
        self._disarm()
        method = self.scope.get("method", "") if self.scope else ""
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "server": self.server, "client": self.client, "scheme": self.scheme, "root_path": "",
            "method": method, "path": header_safe((getattr(self, "url", b"") or b"")[:256].decode("latin-1")), "raw_path": b"",
            "query_string": b"", "headers": [], "state": self.app_state.copy(),
            "extensions": {"tls": self._tls_extension} if self._tls_extension else {},
            REFUSAL_KEY: error,
        }
        task = self.loop.create_task(self._answer_refusal(scope))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer_refusal(self, scope: dict[str, Any]) -> None:
        start: dict[str, Any] = {}

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self._write_answer(start.get("status", 500), start.get("headers", []), message.get("body", b""))

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("answering a refused request from %s", self.client)
        finally:
            self.transport.close()

    def _write_answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self.transport.is_closing():
            return
        phrase = http.HTTPStatus(status).phrase.encode() if status in http.HTTPStatus._value2member_map_ else b""
        head = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        head += [n + b": " + v + b"\r\n" for n, v in headers if n.lower() != b"connection"]
        self.transport.write(b"".join([*head, b"connection: close\r\n\r\n", body]))
