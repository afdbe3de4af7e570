"""``gateway init``: a working development setup in one directory.

Writes ``certs/`` (the development PKI), ``keys/`` (the audit log's and the models' signing
keys; unsigned models in the repository are signed), ``issuer/`` (the built-in issuer's signing key, a demo
service client and a demo admin person with TOTP), ``gateway.toml`` (a commented configuration)
and ``credentials.json`` (each demo principal's certificate paths and token credentials: the
client side of what the server stores only hashed). Existing secrets and
configuration are kept unless ``force`` is given; only what is missing is created.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.registry.signing import SIGNATURE_NAME, sign_model
from gateway.security.issuer import TOKEN_PATH, IssuerStore, enrolment_uri
from gateway.security.pki import Issued, issue_certificate, load_ca, make_ca, write_key, write_pem

__all__ = ["DEMO_PRINCIPALS", "InitReport", "init", "model_signing"]

# name -> what it stands for. "demo" is a service (client credentials, role inference); "admin"
# is a person (password + TOTP, role admin).
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
max_bytes_elements = 65536  # text (BYTES) elements in one request, all inputs together (400 above)
keepalive_timeout_s = 20.0  # idle connections close after this; above clients' pool expiry (httpx 5 s)
handshake_timeout_s = 5.0   # a connection must finish its TLS handshake within this
write_timeout_s = 30.0      # a client that reads none of its answers this long is disconnected
max_connections = 10000     # per process; lowered at start-up to what the file-descriptor limit allows
max_pending_handshakes = 1024               # connections in their handshake at once; more are closed
max_pending_handshakes_per_address = 256    # ... from one client address
max_connections_per_address = 256           # connections from one address (0: no limit; trusted proxies have none)
max_inflight_body_bytes = 536870912         # 512 MiB of request bodies held at once per process (503)
max_inflight_body_bytes_per_principal = 100663296   # 96 MiB per principal (429)
decode_processes = 0        # processes decoding bodies over 64 KiB; 0 = half the CPUs (1 to 4)
decode_memory_mb = 4096     # each decoder's address space; a body needing more gets 413
limit_concurrency = 2048    # connections + in-flight requests per process before 503
runtime_dir = ""            # worker sockets; "" = a fresh private (0700) temporary directory
probe_port = 0              # plain-HTTP /v2/health/live and /ready for orchestrators; 0 = off
worker_user = "nobody"      # when started as root, workers drop to this user's group ("" = stay root)
worker_uid_base = 61184     # ... and each to a user id of its own from this one up (0 = all worker_user's)
debug = false               # true shows internal error details to clients: never in production

[tls]
cert_file = "certs/server.pem"
key_file = "certs/server.key"
client_ca_file = "certs/ca.pem"   # CA that issues client certificates
client_auth = "required"          # "required" | "optional" | "off"  (weaker choices are reported)
min_version = "1.3"               # "1.2" also admits TLS 1.2 (ECDHE + AEAD only)
trusted_proxies = []              # addresses whose X-Forwarded-Client-Cert is honoured
xfcc_hops = 1                     # trusted proxies appending to it: the client's element is this many from the end

[auth]
audience = "https://localhost:{port}"   # the aud every access token must carry
require_token = true        # false: a certificate listed in certificate_roles may act alone (reported)
leeway_s = 30               # clock skew tolerated on exp / nbf / iat

# Roles a verified client certificate adds, by SAN ("URI:...", "DNS:...") or "subject:CN=...".
# [auth.certificate_roles]
# "URI:spiffe://gateway.local/principal/demo" = ["inference"]

# An external OpenID provider (any number of these): keys by discovery, or set jwks_uri.
# [[auth.issuers]]
# issuer = "https://idp.example.com/realms/ml"
# audience = "https://localhost:{port}"
# roles_claims = ["realm_access.roles"]
# typ = "at+jwt"
# require_cert_binding = false

[issuer]                    # the built-in issuer: /oauth/token, /oauth/jwks, /.well-known/...
enabled = true
url = "https://localhost:{port}"
directory = "issuer"        # signing keys, clients, users (private; edit with `gateway clients|users|keys`)
token_ttl_s = 900
max_failed_logins = 100     # failed secrets before an account locks (NIST SP 800-63B)
max_failed_otp = 10         # wrong one-time codes before a person locks (a password alone never clears them)
lockout_s = 900
sign_in_threads = 0         # token requests judged at once (a 16 MiB scrypt each); 0: half the cores

# Deny by default: each rule grants verbs on models to roles. Verbs: infer, metadata, list,
# explain, admin:models, admin:audit, admin:incident ("admin:*" and "*" match several).
[[rbac.rules]]
name = "inference"
roles = ["inference"]
verbs = ["infer", "metadata", "list", "explain"]
models = ["*"]

[[rbac.rules]]
name = "admin"
roles = ["admin"]
verbs = ["*"]
models = ["*"]

# Step-up: administrative verbs need a person who signed in with a second factor within 12 h.
[[rbac.step_up]]
name = "admin-mfa"
verbs = ["admin:*"]
amr_any = ["mfa", "otp", "hwk"]
max_age_s = 43200

[[rbac.rules]]
name = "monitoring"
roles = ["monitoring"]
verbs = ["metrics"]

[audit]
enabled = true
directory = "audit"                      # one subdirectory (chain) per serving process
signing_key = "keys/audit-signing.key"   # Ed25519, signs checkpoints; keep it apart from the log
public_key = "keys/audit-signing.pub"    # for `gateway audit verify`
checkpoint_every = 1000                  # records between signed checkpoints
checkpoint_interval_s = 60.0             # ... or seconds, whichever comes first
max_file_bytes = 67108864                # rotate at 64 MiB ...
rotate_interval_s = 86400.0              # ... or daily; the chain continues across files
durability = "process"                   # the answer leaves once its record is in the file; "fsync": once on disk
fsync_interval_ms = 50.0                 # "process": the fsync follows within this
fail_closed = true                       # 503 rather than serve what cannot be recorded
probe_summary_s = 60.0                   # health probes are counted into one record per this many seconds

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

# The adversarial-input guard (off without detectors). Its calibration is part of the model
# version (calibration.json, signed with it): `gateway models calibrate FOLDER --data clean.npy`.
# Digits are drawn on a 0..16 integer grid, which levels:17 reproduces: an input moved off the
# grid by an attack is squeezed back, and the prediction changes.
[models.digits.guard]
detectors = ["squeeze", "anomaly", "confidence"]
squeezers = ["levels:17"]
target_fpr = 0.01           # on clean inputs, measured on data the model never trained on
action = "flag"             # record | flag (Gateway-Finding header) | reject (422) | throttle
on_error = "record"         # a detector that fails: serve and record it ("reject": 503)
# [models.digits.guard.roles]
# untrusted = "reject"      # per role; the strictest of a caller's roles applies

# Model-extraction monitoring per principal (PRADA, out-of-distribution and boundary-crowding
# query shares; it uses the guard's calibration). An alarm is a security event, and the principal
# gets the action until an operator runs `gateway principals clear NAME --reason ...`.
[models.digits.extraction]
enabled = true
action = "label_only"       # record | label_only (one-hot answers) | throttle | block (403)

[models.resnetish]
version = "1"
workers = 1
device = "auto"
max_batch_size = 16
max_queue_delay_ms = 2.0
intra_op_threads = 2

[models.resnetish.guard]
detectors = ["squeeze", "anomaly"]
squeezers = ["median:2"]    # one squeezed copy per row: twice the rows on the worker
action = "record"

# Security events (detections) go to the audit log and /metrics; a webhook is optional:
# [events]
# webhook_url = "https://siem.example/hooks/gateway"
# webhook_secret_file = "keys/events-webhook.secret"   # HMAC-SHA256 key of Gateway-Signature
"""


GUARDED_DEMO_MODELS = ("digits", "resnetish")
"""The template's models with a guard (and, for digits, an extraction monitor), both of which need
the model version's calibration."""


def _calibratable(models_root: Path, name: str) -> bool:
    """Whether ``name``'s version 1 has a calibration, or held-out data ``gateway init`` calibrates with."""
    return (models_root / name / "1" / "calibration.json").exists() or (
        models_root / "_data" / f"{name}-calibration.npy").exists()


def _guard_off(text: str, name: str) -> str:
    """The configuration with ``name``'s guard and extraction sections commented out, and why."""
    out: list[str] = []
    inside = noted = False
    for line in text.splitlines(keepends=True):
        header = line.strip() in (f"[models.{name}.guard]", f"[models.{name}.extraction]")
        if header and not noted:
            noted = True
            out.append(f"# {name} has no calibration, so its guard and extraction monitor are off. To turn\n"
                       f"# them on: `gateway models calibrate <root>/{name}/1 --data CLEAN.npy`, sign the\n"
                       "# folder again, and uncomment these sections.\n")
        inside = header or (inside and line.strip() != "")
        out.append(f"# {line}" if inside and not line.startswith("#") else line)
    return "".join(out)


def _write_key_pair(private: Path, public: Path, key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> None:
    """A private key (PEM, 0600, in a 0700 folder) and its public half beside it."""
    private.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))


def _audit_keys(keys: Path, force: bool, report: InitReport) -> None:
    """The Ed25519 key that signs audit checkpoints, and its public half for verifiers."""
    private, public = keys / "audit-signing.key", keys / "audit-signing.pub"
    if private.exists() and public.exists() and not force:
        report.kept.append(str(private))
        return
    _write_key_pair(private, public, Ed25519PrivateKey.generate())
    report.created += [str(private), str(public)]


def calibrate_demo_models(config_path: Path, models_root: Path, report: InitReport) -> None:
    """Calibrate each configured model whose guard is on, whose version has no calibration yet,
    and for which ``models/build.py`` left held-out data (``<root>/_data/<name>-calibration.npy``)."""
    from gateway.config import ConfigError, load_config
    from gateway.guards.calibration import CALIBRATION_NAME, calibrate_folder
    from gateway.registry.manifest import ManifestError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        report.created.append(f"(models not calibrated: {exc})")
        return
    for unit, settings in config.units():
        folder = Path(config.models_root) / unit.model / settings.version
        data_file = models_root / "_data" / f"{unit.model}-calibration.npy"
        if not settings.guard.enabled or (folder / CALIBRATION_NAME).exists() or not data_file.exists():
            continue
        where = f"{unit.model}/{settings.version}"
        try:
            calibrate_folder(folder, config.supply, data_file, settings.guard.squeezers, settings.guard.image,
                             settings.guard.target_fpr,
                             progress=lambda text, where=where: print(f"calibrating {where}: {text}", flush=True))
        except (ManifestError, OSError) as exc:
            report.created.append(f"(not calibrated: {exc})")
            continue
        (folder / SIGNATURE_NAME).unlink(missing_ok=True)  # signed again below, with the calibration
        report.created.append(f"{folder / CALIBRATION_NAME} (from {data_file.name})")


def model_signing(keys: Path, models_root: Path, force: bool = False, report: InitReport | None = None,
                  config: Path | None = None) -> None:
    """An EC P-256 model-signing key (kept if there is one), calibrations for the guarded models of
    ``config`` that have none, and signatures for the repository's models that have none."""
    report = report if report is not None else InitReport()
    private, public = keys / "model-signing.key", keys / "model-signing.pub"
    if not (private.exists() and public.exists()) or force:
        _write_key_pair(private, public, ec.generate_private_key(ec.SECP256R1()))
        report.created += [str(private), str(public)]
    else:
        report.kept.append(str(private))
    if config is not None:
        calibrate_demo_models(config, models_root, report)
    for folder in sorted(models_root.glob("*/*")) if models_root.is_dir() else []:
        if (folder / "manifest.json").exists() and not (folder / SIGNATURE_NAME).exists():
            sign_model(folder, private)
            report.created.append(f"{folder / SIGNATURE_NAME} (signed with {private.name})")


def _previous_credentials(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()).get("principals", {}))
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


def _issuer_setup(store_dir: Path, principals: dict[str, Any], previous: dict[str, Any], force: bool,
                  report: InitReport) -> None:
    """Signing key, the demo service client and the demo admin person, unless already there."""
    store = IssuerStore(store_dir)
    if force or not store.signing_keys():
        store.rotate(keep_retired_s=0)
        report.created.append(str(store_dir / "keys.json"))
    old_demo, old_admin = previous.get("demo", {}), previous.get("admin", {})
    if not force and "demo" in store.clients() and old_demo.get("client_secret"):
        principals["demo"].update(client_id="demo", client_secret=old_demo["client_secret"])
    else:
        secret = store.add_client("demo", ["inference"], "demo service (gateway init)")
        principals["demo"].update(client_id="demo", client_secret=secret)
        report.created.append(f"{store_dir / 'clients.json'} (client demo)")
    if not force and "admin" in store.users() and old_admin.get("password"):
        principals["admin"].update({k: old_admin[k] for k in ("username", "password", "totp_secret", "otpauth_uri")
                                    if k in old_admin})
    else:
        password = secrets.token_urlsafe(18)
        totp_secret = store.add_user("admin", password, ["admin"])
        principals["admin"].update(username="admin", password=password, totp_secret=totp_secret,
                                   otpauth_uri=enrolment_uri(totp_secret, "admin", "gateway"))
        report.created.append(f"{store_dir / 'users.json'} (user admin)")


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
    reissue = force
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
        reissue = True  # a new CA invalidates every certificate it did not issue
    _pair(certs, "server", lambda: issue_certificate(
        ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1", "::1")), reissue, report)
    principals = {}
    for name, what in DEMO_PRINCIPALS.items():
        _pair(certs, f"client-{name}", partial(
            issue_certificate, ca, name, server=False, uris=(f"spiffe://gateway.local/principal/{name}",)),
            reissue, report)
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
        text = CONFIG_TEMPLATE.format(port=port, models_root=root)
        for name in GUARDED_DEMO_MODELS:
            if not _calibratable(models_root, name):
                text = _guard_off(text, name)
        config.write_text(text)
        report.created.append(str(config))
    _audit_keys(directory / "keys", force, report)
    cred_path = directory / "credentials.json"
    previous = _previous_credentials(cred_path)
    _issuer_setup(directory / "issuer", principals, previous, force, report)
    model_signing(directory / "keys", models_root, force, report, config)
    url = f"https://localhost:{port}"
    credentials = {
        "gateway": url,
        "ca": str((certs / "ca.pem").resolve()),
        "token_endpoint": url + TOKEN_PATH,
        "principals": principals,
    }
    fd = os.open(cred_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(credentials, f, indent=2)
        f.write("\n")
    report.created.append(str(cred_path))
    return report
