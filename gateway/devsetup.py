"""``gateway init``: a working development setup in one directory.

Writes ``certs/`` (the development PKI), ``gateway.toml`` (a commented configuration) and
``credentials.json`` (each demo principal with its certificate paths). Existing secrets and
configuration are kept unless ``force`` is given; only what is missing is created.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from gateway.security.pki import Issued, issue_certificate, load_ca, make_ca, write_key, write_pem

__all__ = ["DEMO_PRINCIPALS", "InitReport", "init"]

# name -> what it stands for; the identity issue gives each its token credentials and roles.
DEMO_PRINCIPALS = {"demo": "a service calling models (role: inference)", "admin": "an operator (role: admin)"}

CONFIG_TEMPLATE = """\
# Gateway configuration. Every setting is optional; the values shown are the defaults unless
# marked otherwise. Environment variables override it: GATEWAY__SERVER__PORT=9443, say.
# Relative paths are resolved against this file's directory.

[server]
host = "127.0.0.1"          # listen address (HTTPS only)
port = {port}
processes = 1               # serving processes, one SO_REUSEPORT socket each (workers are separate)
request_timeout_s = 30.0    # per-request deadline; past it the answer is 504
max_body_bytes = 33554432   # 32 MiB; larger bodies get 413 (Content-Length or while streaming)
keepalive_timeout_s = 5.0
limit_concurrency = 2048    # connections + in-flight requests per process before 503
runtime_dir = ""            # worker sockets; "" = a fresh private (0700) temporary directory
probe_port = 0              # plain-HTTP /v2/health/live and /ready for orchestrators; 0 = off
worker_user = "nobody"      # when started as root, workers drop to this user ("" = stay root)
debug = false               # true shows internal error details to clients: never in production

[tls]
cert_file = "certs/server.pem"
key_file = "certs/server.key"
client_ca_file = "certs/ca.pem"   # CA that issues client certificates
client_auth = "required"          # "required" | "optional" | "off"  (weaker choices are reported)
min_version = "1.3"               # "1.2" also admits TLS 1.2 (ECDHE + AEAD only)
trusted_proxies = []              # addresses whose X-Forwarded-Client-Cert is honoured

[models]
root = "{models_root}"      # <root>/<name>/<version>/{{model.onnx,manifest.json}}

[models.digits]
version = "1"
workers = 1                 # worker processes, each with its own ONNX Runtime session
device = "auto"             # "auto" | "cuda" (fails loudly without CUDA) | "cpu"
max_batch_size = 64         # dynamic batching: rows joined into one session.run
max_queue_delay_ms = 1.0    # extra wait for a batch to fill, only under concurrent load
intra_op_threads = 1
max_inflight = 256          # queued + running requests per worker before 503

[models.resnetish]
version = "1"
workers = 1
device = "auto"
max_batch_size = 16
max_queue_delay_ms = 2.0
intra_op_threads = 2
"""


@dataclass
class InitReport:
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def _pair(certs: Path, stem: str, make: Callable[[], Issued], force: bool, report: InitReport) -> None:
    pem, key = certs / f"{stem}.pem", certs / f"{stem}.key"
    if pem.exists() and key.exists() and not force:
        report.kept.append(str(pem))
        return
    issued = make()
    write_key(key, issued.key)
    write_pem(pem, issued.cert)
    report.created += [str(pem), str(key)]


def init(directory: Path, models_root: Path, port: int = 8443, force: bool = False) -> InitReport:
    report = InitReport()
    directory.mkdir(parents=True, exist_ok=True)
    certs = directory / "certs"
    certs.mkdir(mode=0o700, exist_ok=True)
    ca_exists = (certs / "ca.pem").exists() and (certs / "ca.key").exists()
    if ca_exists and not force:
        ca = load_ca(certs)
        report.kept.append(str(certs / "ca.pem"))
    else:
        ca = make_ca()
        write_key(certs / "ca.key", ca.key)
        write_pem(certs / "ca.pem", ca.cert)
        report.created += [str(certs / "ca.pem"), str(certs / "ca.key")]
        force = True  # a new CA invalidates every certificate it did not issue
    _pair(certs, "server", lambda: issue_certificate(
        ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1", "::1")), force, report)
    principals = {}
    for name, what in DEMO_PRINCIPALS.items():
        _pair(certs, f"client-{name}", partial(
            issue_certificate, ca, name, server=False, uris=(f"spiffe://gateway.local/principal/{name}",)),
            force, report)
        principals[name] = {
            "description": what,
            "cert": str((certs / f"client-{name}.pem").resolve()),
            "key": str((certs / f"client-{name}.key").resolve()),
        }
    config = directory / "gateway.toml"
    if config.exists() and not force:
        report.kept.append(str(config))
    else:
        root = os.path.relpath(models_root.resolve(), directory.resolve())
        config.write_text(CONFIG_TEMPLATE.format(port=port, models_root=root))
        report.created.append(str(config))
    credentials = {
        "gateway": f"https://localhost:{port}",
        "ca": str((certs / "ca.pem").resolve()),
        "principals": principals,
    }
    cred_path = directory / "credentials.json"
    fd = os.open(cred_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(credentials, f, indent=2)
        f.write("\n")
    report.created.append(str(cred_path))
    return report
