"""``gateway worker serve`` (a worker host) and ``gateway pki issue`` (its certificates)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.commands import add_area, config_opt, load, opt

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["add_parsers", "serve_worker_host"]

TRUST_DOMAIN = "gateway.local"


def serve_worker_host(config_path: str) -> int:
    """Start the configured models' workers, then serve each over mutual TLS until interrupted."""
    import asyncio
    import functools
    import logging
    import signal
    import tempfile

    import uvloop

    from gateway.config import load_config
    from gateway.registry.manifest import load_units
    from gateway.workers.remote import WorkerFront, routes_reader, server_context
    from gateway.workers.supervisor import Supervisor

    log = logging.getLogger("gateway.worker_host")
    if os.geteuid() != 0:
        from gateway.workers.isolation import drop_capabilities

        drop_capabilities()
    config = load_config(config_path)
    refusal = _not_a_worker_host(config, config_path)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    served = [m for m in config.models if m.listen]
    context = server_context(config.tls.cert_file, config.tls.key_file, config.tls.client_ca_file)
    manifests = load_units(config)  # signatures checked against the trusted keys; sealed ones opened
    runtime_dir = Path(config.server.runtime_dir or tempfile.mkdtemp(prefix="gateway-worker-"))
    supervisor = Supervisor(config, manifests, runtime_dir)
    workers = routes_reader(runtime_dir)

    async def run() -> None:
        fronts = [WorkerFront(m.name, m.listen, context, frozenset(config.worker_host.clients),
                              functools.partial(workers, m.name)) for m in served]
        for front in fronts:
            await front.start()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        print(f"Worker host ready: {', '.join(f'{m.name} on {m.listen}' for m in served)}; "
              f"gateways accepted: {', '.join(config.worker_host.clients)}", flush=True)
        await stop.wait()
        for front in fronts:
            await front.close()

    try:
        supervisor.start()
        supervisor.wait_ready()
        log.info("workers ready: %s", supervisor.pids())
        uvloop.run(run())
    finally:
        supervisor.stop()
    return 0


def _not_a_worker_host(config: Config, config_path: str) -> str | None:
    """Why ``config`` cannot run a worker host, or None."""
    if not config.is_worker_host:
        return (f"{config_path} is not a worker host's configuration: add a [worker_host] section "
                "(its clients = the gateways' SPIFFE IDs)")
    if not any(m.listen for m in config.models):
        return f"no model in {config_path} has a listen address ([models.NAME] listen = \"host:port\")"
    if not (config.tls.cert_file and config.tls.key_file and config.tls.client_ca_file):
        return ("a worker host needs [tls] cert_file, key_file (its worker identity) and client_ca_file "
                "(the CA of the gateways' certificates)")
    return None


def _issue(args: argparse.Namespace) -> int:
    import functools

    from gateway.devsetup import InitReport, _pair
    from gateway.security.pki import issue_certificate, load_ca

    certs = Path(args.certs)
    if not (certs / "ca.key").exists():
        print(f"error: {certs / 'ca.key'} is missing: certificates are issued by the CA of `gateway init`",
              file=sys.stderr)
        return 2
    ca = load_ca(certs)
    if args.kind == "worker":
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", args.name) or ".." in args.name:
            print("error: a worker certificate needs a NAME of letters, digits, '.', '_' or '-' "
                  "(gateway pki issue worker gpu-node-1)", file=sys.stderr)
            return 2
        stem, spiffe = f"worker-{args.name}", f"spiffe://{args.trust_domain}/worker/{args.name}"
        make = functools.partial(issue_certificate, ca, args.name, server=True, dns=tuple(args.dns) or ("localhost",),
                                 ips=tuple(args.ip), uris=(spiffe,))
    else:
        stem, spiffe = "gateway-client", f"spiffe://{args.trust_domain}/gateway"
        make = functools.partial(issue_certificate, ca, "gateway", server=False, uris=(spiffe,))
    _pair(certs, stem, make, True, InitReport())
    print(f"issued {certs / stem}.pem and .key for {spiffe}")
    return 0


def _owner(text: str) -> Any:
    from gateway.deployfiles import Owner

    uid, _, gid = text.partition(":")
    return Owner(int(uid), int(gid or uid))


def _export(args: argparse.Namespace) -> int:
    from gateway.deployfiles import ExportError, export_serving_files

    try:
        files = export_serving_files(Path(args.source), Path(args.to), _owner(args.owner),
                                     _owner(args.worker_owner), args.worker)
    except (ExportError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in files:
        print(f"wrote {path}")
    print(f"{args.to}: what a serving container needs, owned by {args.owner}"
          + (f" (worker-certs/ by {args.worker_owner})" if args.worker else "")
          + "; no CA key, model-signing key or client credentials")
    return 0


def _cmd_pki(args: argparse.Namespace) -> int:
    return _export(args) if args.action == "export" else _issue(args)


def _cmd_worker(args: argparse.Namespace) -> int:
    load(args)  # the configuration's errors, all at once, before anything starts
    return serve_worker_host(args.config)


def add_parsers(sub: Any) -> None:
    add_area(sub, "worker", "run this host as a worker host: the models' workers, served to gateways over mTLS",
             _cmd_worker, {"serve": ("start the workers of the models with a listen address and serve them "
                                     "to gateways over mutual TLS", [config_opt()])})
    add_area(sub, "pki", "certificates from the CA of `gateway init` for worker hosts and the gateway; "
             "the files a serving container may hold", _cmd_pki, {
        "issue": ("issue a worker host's certificate (spiffe://<trust domain>/worker/NAME) or the gateway's "
                  "client certificate towards worker hosts (spiffe://<trust domain>/gateway)", [
                      opt("kind", choices=["worker", "gateway"], help="worker, or gateway"),
                      opt("name", nargs="?", default="", help="the worker host's name (worker certificates)"),
                      opt("--certs", default="certs", help="the folder of the CA and certificates (default: certs)"),
                      opt("--trust-domain", default=TRUST_DOMAIN, help=f"default: {TRUST_DOMAIN}"),
                      opt("--dns", action="append", default=[], help="a DNS name of the worker host (repeatable)"),
                      opt("--ip", action="append", default=[], help="an IP address of the worker host (repeatable)"),
                  ]),
        "export": ("copy what a serving container may hold (no CA key, model-signing key or client "
                   "credentials) out of a `gateway init` folder, owned by the container's users", [
                      opt("--from", dest="source", default=".", help="the `gateway init` folder (default: .)"),
                      opt("--to", required=True, help="the folder to write: certs/, keys/, issuer/, audit/, "
                                                      "gateway.toml and, with --worker, worker-certs/"),
                      opt("--owner", default="10001:10001", help="the gateway's uid:gid in the image (default 10001)"),
                      opt("--worker", default="", help="also worker-certs/ from certs/worker-NAME.pem and .key"),
                      opt("--worker-owner", default="10002:10002",
                          help="the worker host's uid:gid in the image (default 10002)"),
                  ])})
