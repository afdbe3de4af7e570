"""``gateway doctor``: a self-audit of a configuration, the files it names, and (given the address
of a running gateway) its running state.

Each finding has a stable id, a severity, what was found and a one-line fix. ``gateway check``
stays the offline validator of a configuration; the doctor also reads certificates, keys, models,
calibrations, the audit chain, Redis, the installed packages and ``/v2/health/ready``.

Severities: ``critical`` (an attacker's way in, or evidence lost), ``high`` (a control is off),
``medium`` (weaker than it should be), ``low`` (worth knowing), ``info``. The exit code is 1 when a
``critical`` or ``high`` finding is there, and under ``--strict`` when any but ``info`` is.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from gateway.config import Config

__all__ = ["FLOORS", "SEVERITIES", "Finding", "diagnose", "exit_code"]

SEVERITIES = ("critical", "high", "medium", "low", "info")
EXPIRY_DAYS = 30
AUDIT_TAIL = 10_000
"""Records of each audit stream's newest file whose chain is verified."""
FLOORS = {
    # package: the first version without the published advisory that concerns how the gateway uses it
    "onnx": (1, 21, 0),  # external-data path traversal
    "starlette": (1, 3, 1),
    "python-multipart": (0, 0, 27),  # only where a dependency brings it: the gateway parses no forms with it
}
MOZILLA_MODERN_GROUPS = ("X25519", "prime256v1", "secp384r1")
DEMO_CA = "Gateway Development CA"


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str
    what: str
    fix: str


def exit_code(findings: list[Finding], strict: bool) -> int:
    worst = {f.severity for f in findings}
    if worst & {"critical", "high"} or (strict and worst - {"info"}):
        return 1
    return 0


def diagnose(config: Config, url: str = "", ca_file: str = "", client_cert: tuple[str, str] | None = None) -> list[Finding]:
    """Every finding about ``config`` (and, with ``url``, the gateway answering there, reached with
    ``client_cert`` (certificate, key) where it requires one)."""
    checks: list[Callable[[], Iterator[Finding]]] = [
        lambda: _settings(config), lambda: _certificates(config), lambda: _keys(config),
        lambda: _credentials(config), lambda: _admin_mfa(config), lambda: _explain(config),
        lambda: _unhardened_outputs(config), lambda: _models(config), lambda: _audit(config), lambda: _redis(config),
        lambda: _packages(),
    ]
    if url:
        checks += [lambda: _running(config, url, ca_file, client_cert)]
    out: list[Finding] = []
    for check in checks:
        try:
            out.extend(check())
        except Exception as exc:  # a check that cannot run is itself a finding, never a crash
            out.append(Finding("doctor-check-failed", "medium", f"a check could not run: {type(exc).__name__}: {exc}",
                               "fix what it names and run the doctor again"))
    return sorted(out, key=lambda f: (SEVERITIES.index(f.severity), f.id))


# -- the configuration ----------------------------------------------------------------------------

def _settings(c: Config) -> Iterator[Finding]:
    if c.tls.client_auth != "required":
        yield Finding("tls-mtls-not-required", "high", f'tls.client_auth = "{c.tls.client_auth}"',
                      'set tls.client_auth = "required"')
    if c.tls.min_version != "1.3":
        yield Finding("tls-1.2-accepted", "medium", 'tls.min_version = "1.2"', 'set tls.min_version = "1.3"')
    for net in c.tls.trusted_proxies:
        if ipaddress.ip_network(net, strict=False).prefixlen == 0:
            yield Finding("trusted-proxies-wildcard", "critical", f"tls.trusted_proxies holds {net}: anyone can "
                          "assert a client certificate in X-Forwarded-Client-Cert", "list only your proxies' addresses")
    if c.server.debug:
        yield Finding("debug-mode", "high", "server.debug = true: internal error details reach clients",
                      "set server.debug = false")
    if not c.server.worker_user and os.geteuid() == 0:
        yield Finding("workers-not-isolated", "high", "workers run as root, the gateway's own user",
                      'set server.worker_user (and worker_uid_base) to an unprivileged user')
    elif os.geteuid() != 0 and not (c.server.worker_exec and c.server.worker_user):
        yield Finding("workers-not-isolated", "medium", "workers run as the gateway's own user and can read its keys",
                      "in the image keep server.worker_exec (its set-user-ID helper); elsewhere run as root "
                      "with server.worker_user set, so that workers drop to their own user")
    if not c.limits.per_address and not c.limits.per_principal:
        yield Finding("limits-off", "high", "neither limits.per_address nor limits.per_principal is set",
                      'set limits.per_principal (e.g. "100/second") and limits.per_address')
    if c.state_per_process:
        yield Finding("state-per-process", "high", f"server.processes = {c.server.processes} with limits.storage = "
                      f'"{c.limits.storage}": each serving process counts alone, so every rate limit, budget and '
                      f"sign-in lockout is {c.server.processes} times what it says and a one-time code can be "
                      "used once in each process", "set limits.storage to a Redis server the processes share "
                      "(redis:// on loopback, rediss:// elsewhere), or server.processes = 1")
    if not c.server.max_connections_per_address:
        yield Finding("connections-per-address-unlimited", "medium", "server.max_connections_per_address = 0: one "
                      "client's kept-alive connections can take every place under server.limit_concurrency",
                      "set server.max_connections_per_address (256 by default; a proxy in front is exempt when "
                      "listed in tls.trusted_proxies)")
    if not c.limits.budget_inferences and not c.limits.budget_rows:
        yield Finding("budgets-off", "medium", "no query budget (limits.budget_inferences, budget_rows)",
                      'set limits.budget_inferences (e.g. "100000/day"): budgets bound model extraction')
    if not c.supply.require_signature:
        yield Finding("models-unsigned-accepted", "critical", "supply.require_signature = false",
                      "set supply.require_signature = true and sign the models (gateway models sign)")
    if not c.audit.enabled:
        yield Finding("audit-off", "critical", "audit.enabled = false: requests are not recorded",
                      "set audit.enabled = true")
    elif not c.audit.fail_closed:
        yield Finding("audit-fail-open", "high", "audit.fail_closed = false: requests are served unrecorded when "
                      "the log cannot be written", "set audit.fail_closed = true")
    if not c.auth.require_token:
        yield Finding("certificate-only-access", "medium", "auth.require_token = false",
                      "set auth.require_token = true unless certificate-only clients are intended")


# -- files --------------------------------------------------------------------------------------------

def _certificates(c: Config) -> Iterator[Finding]:
    from cryptography import x509

    now = dt.datetime.now(dt.UTC)
    names = [("server certificate", c.tls.cert_file)]
    if c.tls.client_auth != "off":
        names.append(("client CA", c.tls.client_ca_file))
    for what, path in names:
        for cert in x509.load_pem_x509_certificates(Path(path).read_bytes()):
            left = cert.not_valid_after_utc - now
            subject = cert.subject.rfc4514_string()
            if left.total_seconds() <= 0:
                yield Finding("certificate-expired", "critical", f"{what} {path} ({subject}) expired "
                              f"{cert.not_valid_after_utc:%Y-%m-%d}", "issue a new one and reload")
            elif left < dt.timedelta(days=EXPIRY_DAYS):
                yield Finding("certificate-expiring", "high", f"{what} {path} ({subject}) expires in {left.days} days",
                              "issue a new one before it expires")
            if DEMO_CA in subject or DEMO_CA in cert.issuer.rfc4514_string():
                yield Finding("demo-ca", "high", f"{what} {path} is from the development CA that `gateway init` "
                              "made", "use certificates from your own CA (tls.cert_file, tls.client_ca_file)")


def _keys(c: Config) -> Iterator[Finding]:
    keys = [c.tls.key_file, c.audit.signing_key, c.supply.signing_key, c.supply.kek_file,
            c.events.webhook_secret_file]
    issuer = Path(c.issuer.directory)
    if issuer.is_dir():
        keys += [str(p) for p in issuer.iterdir() if p.suffix in (".json", ".key", ".pem")]
    for path in dict.fromkeys(k for k in keys if k):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            yield Finding("private-key-readable", "critical", f"{path} is readable by others (mode {mode & 0o777:o})",
                          f"chmod 600 {path}")


def _credentials(c: Config) -> Iterator[Finding]:
    """The credentials ``gateway init`` wrote beside the configuration, where they still work."""
    from gateway.security.accounts import IssuerStore, verify_secret

    written = Path(c.source).parent / "credentials.json" if c.source else None
    if written is None or not written.is_file() or not c.issuer.enabled or not Path(c.issuer.directory).is_dir():
        return
    store = IssuerStore(c.issuer.directory)
    clients, users = store.clients(), store.users()
    working = []
    for creds in json.loads(written.read_text()).get("principals", {}).values():
        if "client_secret" in creds and creds.get("client_id") in clients:
            if verify_secret(creds["client_secret"], clients[creds["client_id"]]["secret_hash"]):
                working.append(f"client {creds['client_id']}")
        elif "password" in creds and creds.get("username") in users:
            if verify_secret(creds["password"], users[creds["username"]]["password_hash"]):
                working.append(f"user {creds['username']}")
    if working:
        yield Finding("demo-credentials", "high", f"{written}: the demo credentials of `gateway init` still work "
                      f"({', '.join(working)})", "gateway clients remove demo; gateway users remove admin (after "
                      "adding your own), and delete the file")


def _admin_mfa(c: Config) -> Iterator[Finding]:
    from fnmatch import fnmatch

    covered = any(any(fnmatch("admin:incident", v) for v in rule.verbs) and (rule.amr_any or rule.acr_min)
                  for rule in c.rbac.step_up)
    if not covered:
        yield Finding("admin-without-mfa", "critical", "no rbac.step_up rule asks a second factor for admin:* verbs",
                      'add [[rbac.step_up]] verbs = ["admin:*"] amr_any = ["mfa", "otp", "hwk"]')


def _explain(c: Config) -> Iterator[Finding]:
    """Roles that may explain a model whose answers are hardened for them: output policies and the
    guard do not apply to explanations, which hold the raw prediction and a gradient."""
    from fnmatch import fnmatchcase

    seen: set[tuple[str, str]] = set()
    for unit, settings in c.units():
        for rule in c.rbac.rules:
            if not (any(fnmatchcase("explain", v) for v in rule.verbs)
                    and any(fnmatchcase(unit.model, m) for m in rule.models)):
                continue
            for role in rule.roles:
                policy = settings.output.policy_for((role,))
                rejects = settings.guard.enabled and settings.guard.action_for((role,)) == "reject"
                if (policy == "full" and not rejects) or (unit.model, role) in seen:
                    continue
                seen.add((unit.model, role))
                hardened = f"output policy {policy}" if policy != "full" else "the guard rejecting suspect inputs"
                yield Finding("explain-bypasses-hardening", "medium",
                              f"rbac rule {rule.name!r} lets role {role!r} explain {unit.model}, whose answers it gets "
                              f"with {hardened}; an explanation holds the raw prediction and a gradient, and neither "
                              "applies to it",
                              f"take explain out of rule {rule.name!r} for {unit.model}, or harden no answers for {role!r}")


def _unhardened_outputs(c: Config) -> Iterator[Finding]:
    """Models whose answers are hardened (an output policy, or an extraction alarm's ``label_only``)
    for some caller while a floating-point output of theirs is not rows × scores: the policies
    apply only to those, so that output reaches the caller as the model answered it."""
    from gateway.registry.manifest import load_manifest
    from gateway_client.protocol.datatypes import FLOATS

    for unit, settings in c.units():
        policies = {settings.output.policy, *(policy for _, policy in settings.output.roles)} - {"full"}
        extraction = settings.extraction
        if extraction.enabled and "label_only" in {extraction.action, *(action for _, action in extraction.roles)}:
            policies.add("label_only (an extraction alarm's)")
        if not policies:
            continue
        try:
            manifest = load_manifest(Path(c.models_root) / unit.model / settings.version)
        except (OSError, ValueError):
            continue  # the model-missing and model-signature findings name it
        passing = [f"{s.name} {list(s.shape)}" for s in manifest.outputs
                   if s.datatype in FLOATS and len(s.shape) != 2]
        if passing:
            yield Finding("output-policy-not-applied", "medium",
                          f"models.{unit.model} hardens answers with {', '.join(sorted(policies))}, which apply to "
                          f"two-dimensional scores (rows × classes) only; its output {', '.join(passing)} reaches "
                          "every caller as the model answered it",
                          f"give the model a [-1, classes] scores output (a Reshape at the end of its graph), or do "
                          f"not serve {unit.model} to the roles its policy is meant to restrict")


def _models(c: Config) -> Iterator[Finding]:
    from gateway.guards.calibration import CALIBRATION_NAME
    from gateway.registry.signing import SignatureError, verify_model

    for unit, settings in c.units():
        folder = Path(c.models_root) / unit.model / settings.version
        if not folder.is_dir():
            yield Finding("model-missing", "high", f"{folder} does not exist", "deploy the model version or fix the path")
            continue
        try:
            verify_model(folder, [Path(k) for k in c.supply.trusted_keys])
        except (SignatureError, OSError, ValueError) as exc:
            yield Finding("model-signature", "critical", f"{folder}: {exc}", f"gateway models sign {folder} (with a "
                          "trusted key), or replace the folder with a signed one")
        if (settings.guard.enabled or settings.extraction.enabled) and not (folder / CALIBRATION_NAME).exists():
            yield Finding("calibration-missing", "high", f"{folder}: a guard or the extraction monitor is on and "
                          "there is no calibration.json (the gateway will refuse to start)",
                          f"gateway models calibrate {folder} --data clean.npy")
        if not settings.extraction.enabled:
            yield Finding("extraction-monitor-off", "low", f"models.{unit.model}.extraction is off",
                          f"set [models.{unit.model}.extraction] enabled = true")
        yield from _answers_unbounded(folder, unit.model)


def _answers_unbounded(folder: Path, model: str) -> Iterator[Finding]:
    from gateway.registry.manifest import load_manifest

    try:
        batch = load_manifest(folder).batch
    except (OSError, ValueError):
        return  # the model-signature finding names it
    if not batch:
        yield Finding("answers-not-bounded-by-rows", "low",
                      f"{folder}: the manifest does not declare batch, so a worker's answer to {model} is held to "
                      "256 MiB and its shape, not to the request's rows",
                      f'if {model} answers one row per input row, add "batch": true to its manifest.json and sign it '
                      "again (gateway models sign)")


def _audit(c: Config) -> Iterator[Finding]:
    from gateway.audit.chain import load_public_key, stream_files, verify_paths

    if not c.audit.enabled or not Path(c.audit.directory).is_dir():
        return
    streams = stream_files([c.audit.directory])
    newest = [files[-1] for files in streams.values() if files]
    if not newest:
        return
    public = load_public_key(c.audit.public_key)
    report = verify_paths(newest, public, allow_unsealed=True, require_manifest=False)
    for problem in report.problems:
        if "no checkpoint" in problem or "does not start" in problem:
            continue  # a newest file alone starts mid-chain: only breaks inside it count
        yield Finding("audit-chain-broken", "critical", problem,
                      f"gateway audit verify {c.audit.directory}; treat it as an incident (docs/incident-response.md)")


def _redis(c: Config) -> Iterator[Finding]:
    storage = c.limits.storage
    if not c.limits.shared:
        return
    if storage.startswith("redis://") and "@" not in storage.split("/")[2] and not storage.startswith(
            ("redis://127.0.0.1", "redis://localhost", "redis://[::1]")):
        yield Finding("redis-plaintext", "high", "limits.storage is plain redis:// to another host",
                      "use rediss:// with a password")
    import redis

    try:
        redis.Redis.from_url(storage, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        yield Finding("redis-unreachable", "high", f"limits.storage {storage.split('@')[-1]}: {exc}",
                      "start Redis or fix limits.storage; meanwhile limits, alarms and incident controls are per process")


def _packages() -> Iterator[Finding]:
    for name, floor in FLOORS.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if tuple(int(p) for p in re.findall(r"\d+", installed)[:3]) < floor:
            yield Finding("package-below-floor", "high", f"{name} {installed} is below the security floor "
                          f"{'.'.join(map(str, floor))}", f"pip install '{name}>={'.'.join(map(str, floor))}'")


# -- the running gateway ----------------------------------------------------------------------------

def _running(c: Config, url: str, ca_file: str, client_cert: tuple[str, str] | None) -> Iterator[Finding]:
    import httpx

    ctx = ssl.create_default_context(cafile=ca_file or c.tls.client_ca_file)
    if client_cert is not None:
        ctx.load_cert_chain(*client_cert)
    try:
        ready = httpx.get(url.rstrip("/") + "/v2/health/ready", verify=ctx, timeout=10)
    except httpx.HTTPError as exc:
        yield Finding("gateway-unreachable", "high", f"{url}: {exc}", "start it, or give the right --url")
        return
    if ready.status_code != 200:
        yield Finding("gateway-not-ready", "high", f"{url}/v2/health/ready answered {ready.status_code}",
                      "see the gateway's log")
    for area, why in (ready.json().get("degraded") or {}).items():
        yield Finding(f"degraded-{area}", "high", f"{area}: {why}"[:300], "see the gateway's log for the cause")
    yield from _groups(url, client_cert)


def _groups(url: str, client_cert: tuple[str, str] | None) -> Iterator[Finding]:
    """Whether the gateway completes a TLS handshake over a key-exchange group beyond Mozilla's
    modern list (``openssl s_client`` offers only such groups)."""
    import shutil
    import subprocess
    from urllib.parse import urlsplit

    if shutil.which("openssl") is None:
        return
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 443
    socket.getaddrinfo(host, port)
    cert = ["-cert", client_cert[0], "-key", client_cert[1]] if client_cert else []
    out = subprocess.run(["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", host,
                          "-groups", "ffdhe2048:ffdhe3072:x448:secp521r1", "-brief", *cert],
                         input=b"", capture_output=True, timeout=15)
    text = (out.stdout + out.stderr).decode(errors="replace")
    if "Peer Temp Key" in text or "Negotiated TLS1.3 group" in text or "CONNECTION ESTABLISHED" in text:
        yield Finding("tls-groups-beyond-modern", "medium", "the gateway agrees to key exchange over groups outside "
                      f"Mozilla's modern list ({', '.join(MOZILLA_MODERN_GROUPS)})",
                      "restrict the server's groups (OpenSSL configuration: Groups = X25519:prime256v1:secp384r1)")


def as_json(findings: list[Finding]) -> str:
    return json.dumps({"findings": [asdict(f) for f in findings],
                       "counts": {s: sum(f.severity == s for f in findings) for s in SEVERITIES}}, indent=2)
