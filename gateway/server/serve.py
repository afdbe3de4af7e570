"""Running the gateway: the workers' supervisor, then the serving processes on uvicorn, and reloads.

``serve`` validates the configuration, starts and waits for the workers, writes the pid file, and
serves HTTPS through ``HandshakeGuard`` and ``TLSHttpToolsProtocol`` (``gateway.server.protocol``);
SIGHUP reloads model versions (``gateway models reload``), each event written to the supervisor's
audit stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import uvicorn

from gateway.config import Config, load_config
from gateway.registry.manifest import ManifestError, load_units
from gateway.server.processes import ServingProcesses, connection_budget
from gateway.server.protocol import HandshakeGuard
from gateway.server.uvconfig import GatewayUvicornConfig

__all__ = ["serve"]

log = logging.getLogger("gateway.server")


def _uvicorn_config(config: Config) -> GatewayUvicornConfig:
    s = config.server
    return GatewayUvicornConfig(
        config,
        connection_budget(config),
        app="gateway.app:app_from_environment",
        factory=True,
        host=s.host,
        port=s.port,
        workers=s.processes,
        http=HandshakeGuard,
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
    )


def shared_metrics(runtime_dir: Path) -> None:
    """Several serving processes count into one view: prometheus_client's multiprocess mode, its
    files in a private directory of the runtime directory (emptied first: counts start at zero with
    the gateway), named to the serving processes before they start."""
    directory = runtime_dir / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


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
            shared_metrics(runtime_dir)
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

            self.writer = AuditWriter(config.audit, config.audit.stream("supervisor"),
                                      load_private_key(config.audit.signing_key))
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


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _announce(config: Config) -> None:
    s = config.server
    host = "localhost" if s.host in ("127.0.0.1", "0.0.0.0", "::") else s.host
    certs = Path(config.tls.client_ca_file).parent
    base = f"https://{host}:{s.port}"
    tls = f"--cacert {certs}/ca.pem --cert {certs}/client-demo.pem --key {certs}/client-demo.key"
    creds = Path(config.source).parent / "credentials.json" if config.source else Path("credentials.json")
    digit = "0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0"
    grey = ",".join(["8"] * 64)
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
    infer = f'  curl -i $TLS -H "Authorization: Bearer $TOKEN" -H \'content-type: application/json\' {base}/v2/models/digits/infer \\'
    body = "       -d '{{\"inputs\":[{{\"name\":\"input\",\"datatype\":\"FP32\",\"shape\":[1,64],\"data\":[{}]}}]}}'"
    lines += [
        "  # a handwritten 0",
        infer, body.format(digit),
        "  # a flat grey square is no digit: where the guard flags, the answer carries gateway-finding",
        infer, body.format(grey),
        "",
    ]
    print("\n".join(lines), flush=True)
