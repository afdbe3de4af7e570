"""Running the gateway: uvicorn with our own HTTP protocol class, the workers' supervisor, probes.

uvicorn verifies client certificates but does not hand them to the application (the ASGI ``tls``
extension is unmerged: uvicorn PRs 3132/3133), so ``TLSHttpToolsProtocol`` reads the verified
peer certificate once per connection and puts it into ``scope["extensions"]["tls"]``. It also
answers malformed requests and oversized headers with problem+json rather than plain text.
uvicorn is pinned in ``pyproject.toml`` because this subclasses its protocol.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from gateway.config import Config, load_config
from gateway.errors import problem_body
from gateway.httpserver import BufferedBodyProtocol
from gateway.registry.manifest import ManifestError, load_units
from gateway.security.tls import HANDSHAKES, build_server_context, identity_from_der

__all__ = ["GatewayUvicornConfig", "TLSHttpToolsProtocol", "serve"]

log = logging.getLogger("gateway.server")

MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024  # Envoy's edge default buffer per connection


def _raw_problem(status: int, reason: bytes, type_: str, title: str, detail: str) -> bytes:
    body = orjson.dumps(problem_body(status, type_, title, detail, "", None, True))
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        b"content-type: application/problem+json\r\n",
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body),
        body,
    ])


class TLSHttpToolsProtocol(BufferedBodyProtocol):
    """httptools protocol that exposes the verified client certificate and bounds headers and time.

    Slow clients are cut off: the request line and headers must arrive within
    ``server.header_timeout_s`` of the connection opening (or of the request starting, on a
    kept-alive connection), and the body within ``server.body_timeout_s`` of the headers; else the
    answer is 408 (if nothing was answered yet) and the connection is closed. uvicorn has no such
    timers (only the idle keep-alive one), so a Slowloris client could hold a connection forever.
    """

    _tls_extension: Any = None
    _timer: asyncio.TimerHandle | None = None
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._too_slow, what, seconds)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self, what: str, seconds: float) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_raw_problem(
                408, b"Request Timeout", "request-timeout", "Request timeout",
                f"the request {what} did not arrive within {seconds:g} s"))
        log.info("closed a connection from %s: request %s slower than %g s", self.client, what, seconds)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        HANDSHAKES["completed"] += 1
        gateway_config = getattr(self.config, "gateway_config", None)
        if gateway_config is not None:
            self.header_timeout_s = gateway_config.server.header_timeout_s
            self.body_timeout_s = gateway_config.server.body_timeout_s
        self._arm(self.header_timeout_s, "headers")
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        self._tls_extension = {
            "client_cert_der": der,
            "client_identity": identity_from_der(der) if der else None,
            "tls_version": ssl_object.version(),
            "cipher": (ssl_object.cipher() or ("",))[0],
        }

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s, "headers")
        self._header_bytes = 0
        if self._tls_extension is not None:
            self.scope["extensions"] = {"tls": self._tls_extension}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if len(self.headers) >= MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            self.transport.write(_raw_problem(
                431, b"Request Header Fields Too Large", "headers-too-large",
                "Request headers too large",
                f"at most {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes of headers are accepted",
            ))
            self.transport.close()
            # Stop the parser: httptools surfaces this as a parse error, which we then ignore.
            raise ValueError("headers too large")
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(_raw_problem(400, b"Bad Request", "bad-request", "Malformed request", msg))
        self.transport.close()


class GatewayUvicornConfig(uvicorn.Config):
    """uvicorn's config with our SSL context (uvicorn's own cannot express mTLS policy fully)."""

    def __init__(self, gateway_config: Config, **kwargs: Any) -> None:
        self.gateway_config = gateway_config
        super().__init__(**kwargs)

    def load(self) -> None:
        super().load()
        self.ssl = build_server_context(self.gateway_config.tls)


def _uvicorn_config(config: Config) -> GatewayUvicornConfig:
    s = config.server
    return GatewayUvicornConfig(
        config,
        app="gateway.app:app_from_environment",
        factory=True,
        host=s.host,
        port=s.port,
        workers=s.processes,
        http=TLSHttpToolsProtocol,
        loop="uvloop",
        ws="none",
        lifespan="on",
        access_log=False,
        log_level=s.log_level,
        timeout_keep_alive=int(s.keepalive_timeout_s),
        limit_concurrency=s.limit_concurrency,
        backlog=s.backlog,
        server_header=False,
        date_header=False,
        # Never trust X-Forwarded-For/-Proto (uvicorn trusts 127.0.0.1 by default): client
        # identity comes from the TLS handshake, or from XFCC sent by a configured trusted proxy.
        proxy_headers=False,
        # Placeholders so uvicorn's own checks see TLS on; load() swaps in our context.
        ssl_keyfile=config.tls.key_file,
        ssl_certfile=config.tls.cert_file,
    )


def serve(config_path: str) -> int:
    """Start the workers, wait for them, then serve HTTPS until interrupted."""
    from gateway.workers.supervisor import Supervisor

    config = load_config(config_path)
    manifests = load_units(config)
    runtime_dir = Path(config.server.runtime_dir or tempfile.mkdtemp(prefix="gateway-"))
    supervisor = Supervisor(config, manifests, runtime_dir)
    os.environ["GATEWAY_CONFIG"] = str(Path(config_path).resolve())
    os.environ["GATEWAY_RUNTIME_DIR"] = str(runtime_dir)
    for warning in config.insecure_settings():
        log.warning("insecure setting: %s", warning)
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM disposition that would end the process before the workers are stopped.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    events = ModelEvents(config)
    try:
        supervisor.start()
    except ManifestError as exc:
        events.write([{"event": "refuse", "reason": str(exc)}])
        events.close()
        raise
    events.write(supervisor.events)
    try:
        supervisor.wait_ready()
        log.info("workers ready: %s", supervisor.pids())
        Path(config.server.pid_file).write_text(f"{os.getpid()}\n")
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(
            target=_reload, args=(supervisor, config_path, events), name="reload", daemon=True).start())
        ucfg = _uvicorn_config(config)
        _announce(config)
        if config.server.processes > 1:
            ServingProcesses(ucfg, config.server.processes).run()
        else:
            import uvloop

            uvloop.run(_serve_single(ucfg, config))
    finally:
        supervisor.stop()
        events.close()
        Path(config.server.pid_file).unlink(missing_ok=True)
    return 0


class ModelEvents:
    """The supervisor's audit stream: every model load, refusal, quarantine and swap."""

    def __init__(self, config: Config) -> None:
        self.writer = None
        if config.audit.enabled:
            from gateway.audit.chain import load_private_key
            from gateway.audit.writer import AuditWriter

            self.writer = AuditWriter(config.audit, "supervisor", load_private_key(config.audit.signing_key))
            self.writer.open()
        self._lock = threading.Lock()

    def write(self, events: list[dict[str, object]]) -> None:
        if self.writer is None:
            return
        with self._lock:
            for event in events:
                try:
                    self.writer.append_now({"kind": "model", **event})
                except OSError as exc:
                    log.error("cannot record a model event in the audit log: %s (%s)", exc, event)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close_now()


def _reload(supervisor: Any, config_path: str, events: ModelEvents) -> None:
    """SIGHUP (``gateway models reload``): swap in changed model versions, keep the rest serving."""
    log.info("reload requested")
    try:
        config = load_config(config_path)
    except Exception as exc:
        log.error("reload refused: the configuration does not load: %s", exc)
        events.write([{"event": "refuse", "reason": f"configuration: {exc}"[:1000]}])
        return
    try:
        done = supervisor.reload(config)
    except Exception:
        log.exception("reload failed")
        return
    events.write(done)
    log.info("reload finished: %s", ", ".join(f"{e['model']}/{e['version']} {e['event']}" for e in done) or "nothing changed")


async def _serve_single(ucfg: GatewayUvicornConfig, config: Config) -> None:
    servers = [uvicorn.Server(ucfg)]
    if config.server.probe_port:
        servers.append(uvicorn.Server(uvicorn.Config(
            "gateway.probes:probe_app_from_environment", factory=True,
            host=config.server.probe_host, port=config.server.probe_port,
            log_level="warning", access_log=False, lifespan="on", ws="none",
        )))
    await asyncio.gather(*(s.serve() for s in servers))


def reuse_port_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket of its own for one serving process (``SO_REUSEPORT``).

    With one socket shared by every process (uvicorn's multi-process mode), connections that
    arrive together are often all accepted by one process while the others idle; with a socket
    each, the kernel spreads new connections across the processes.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def _serving_process(ucfg: GatewayUvicornConfig, parent_pid: int, index: int) -> None:
    from gateway.workers.isolation import die_with_parent

    die_with_parent(parent_pid)
    os.environ["GATEWAY_PROCESS_INDEX"] = str(index)  # names this process's audit chain
    sock = reuse_port_socket(ucfg.host, ucfg.port, ucfg.backlog)
    uvicorn.Server(ucfg).run(sockets=[sock])


class ServingProcesses:
    """``count`` serving processes, each on its own ``SO_REUSEPORT`` socket; a dead one is
    restarted (after a second), and all are stopped when this process is told to stop."""

    def __init__(self, ucfg: GatewayUvicornConfig, count: int) -> None:
        self.ucfg = ucfg
        self.count = count
        self.context = multiprocessing.get_context("spawn")

    def _start(self, index: int) -> multiprocessing.process.BaseProcess:
        proc = self.context.Process(target=_serving_process, args=(self.ucfg, os.getpid(), index),
                                    name=f"gateway-serve-{index}")
        proc.start()
        return proc

    def run(self) -> None:
        procs = [self._start(i) for i in range(self.count)]
        try:
            while True:
                time.sleep(1.0)
                for i, proc in enumerate(procs):
                    if not proc.is_alive():
                        log.warning("serving process %s exited (%s); restarting it", proc.pid, proc.exitcode)
                        procs[i] = self._start(i)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _announce(config: Config) -> None:
    s = config.server
    host = "localhost" if s.host in ("127.0.0.1", "0.0.0.0", "::") else s.host
    certs = Path(config.tls.client_ca_file).parent
    base = f"https://{host}:{s.port}"
    tls = f"--cacert {certs}/ca.pem --cert {certs}/client-demo.pem --key {certs}/client-demo.key"
    creds = Path(config.source).parent / "credentials.json" if config.source else Path("credentials.json")
    data = ",".join(["8"] * 64)
    lines = [
        f"\nGateway listening on {base} (mTLS {config.tls.client_auth}); models: {', '.join(m.name for m in config.models)}",
        "Try it:",
        f"  TLS='{tls}'",
        f"  curl $TLS {base}/v2/health/ready",
    ]
    if config.issuer.enabled:
        lines += [
            "  # a token for the demo service (its secret is in credentials.json)",
            f"  SECRET=$(python3 -c 'import json; print(json.load(open(\"{creds}\"))[\"principals\"][\"demo\"][\"client_secret\"])')",
            f"  TOKEN=$(curl -s $TLS -u demo:$SECRET -d grant_type=client_credentials {base}/oauth/token"
            " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')",
        ]
    lines += [
        f'  curl $TLS -H "Authorization: Bearer $TOKEN" -H \'content-type: application/json\' {base}/v2/models/digits/infer \\',
        f"       -d '{{\"inputs\":[{{\"name\":\"input\",\"datatype\":\"FP32\",\"shape\":[1,64],\"data\":[{data}]}}]}}'",
        "",
    ]
    print("\n".join(lines), flush=True)
