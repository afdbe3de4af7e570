"""The checks a loaded configuration must pass, each a readable sentence when it fails: ranges,
files that must exist, identifiers, URLs, and settings that contradict each other. ``load_config``
reports every failure at once."""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import pwd
import re
from pathlib import Path

import limits as limits_lib

from gateway.config import ALGORITHMS, VERBS, Config

__all__ = ["check_ranges", "crl_problems"]


_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Model names and versions (``fullmatch``, so no trailing newline slips through ``$``)."""


Check = tuple[bool, str]


def _server_checks(cfg: Config) -> list[Check]:
    s = cfg.server
    checks = [
        (1 <= s.port <= 65535, "server.port must be 1..65535"),
        (0 <= s.probe_port <= 65535, "server.probe_port must be 0..65535"),
        (1 <= s.processes <= 64, "server.processes must be 1..64"),
        (s.request_timeout_s > 0, "server.request_timeout_s must be positive"),
        (s.max_body_bytes >= 1024, "server.max_body_bytes must be at least 1024"),
        (s.max_bytes_elements >= 1, "server.max_bytes_elements must be at least 1"),
        (s.max_inflight_body_bytes >= s.max_inflight_body_bytes_per_principal >= s.max_body_bytes,
         "server: max_inflight_body_bytes >= max_inflight_body_bytes_per_principal >= max_body_bytes"),
        (0 <= s.decode_processes <= 64 and s.decode_memory_mb >= 256,
         "server.decode_processes must be 0..64 and server.decode_memory_mb at least 256"),
        (0 < s.header_timeout_s <= 300 and 0 < s.body_timeout_s <= 3600,
         "server.header_timeout_s must be 0..300 and server.body_timeout_s 0..3600"),
        (1 <= s.keepalive_timeout_s <= 3600, "server.keepalive_timeout_s must be 1..3600"),
        (0 < s.handshake_timeout_s <= 60 and 0 < s.write_timeout_s <= 3600,
         "server.handshake_timeout_s must be 0..60 and server.write_timeout_s 0..3600"),
        (1 <= s.max_pending_handshakes_per_address <= s.max_pending_handshakes <= s.max_connections,
         "server: 1 <= max_pending_handshakes_per_address <= max_pending_handshakes <= max_connections"),
        (0 <= s.max_connections_per_address <= s.max_connections,
         "server.max_connections_per_address must be 0 (no limit) to max_connections"),
        (not (s.probe_port and s.processes > 1),
         "server.probe_port needs server.processes = 1 (probes are not served per process yet)"),
    ]
    for m in cfg.models:
        where = f"models.{m.name}"
        checks.append((bool(_IDENTIFIER.fullmatch(m.name)) and ".." not in m.name,
                       f"{where}: the name is not a valid identifier ([A-Za-z0-9][A-Za-z0-9_.-]*)"))
        for v in (m.version, *m.versions):
            checks.append((bool(_IDENTIFIER.fullmatch(v)) and ".." not in v, f"{where}: version {v!r} is not a valid identifier"))
        checks += [
            (0 <= m.workers <= 64 and (m.workers > 0 or bool(m.endpoints)),
             f"{where}.workers must be 1..64 (0 only with endpoints)"),
            (all(_address(a) for a in (*m.endpoints, *([m.listen] if m.listen else []))),
             f"{where}: endpoints and listen are host:port"),
            (1 <= m.max_batch_size <= 4096, f"{where}.max_batch_size must be 1..4096"),
            (0 <= m.max_queue_delay_ms <= 1000, f"{where}.max_queue_delay_ms must be 0..1000"),
            (m.intra_op_threads >= 0, f"{where}.intra_op_threads must be >= 0"),
            (m.max_inflight >= 1, f"{where}.max_inflight must be >= 1"),
            (m.batch_buckets in ("auto", "off") or all(p.strip().isdigit() and int(p) > 0 for p in m.batch_buckets.split(",")),
             f'{where}.batch_buckets must be "auto", "off" or comma-separated sizes'),
        ]
    return checks


def _address(address: str) -> bool:
    from gateway.workers.remote import split_address

    try:
        split_address(address)
    except ValueError:
        return False
    return True


def remote_worker_problems(cfg: Config) -> list[str]:
    """With ``endpoints``, the gateway's client certificate towards worker hosts must be there."""
    if not any(m.endpoints for m in cfg.models):
        return []
    r = cfg.remote_workers
    problems = [f"remote_workers.{name}: {path or 'not set'}: no such file (`gateway pki issue gateway` makes one)"
                for name, path in (("cert_file", r.cert_file), ("key_file", r.key_file), ("ca_file", r.ca_file))
                if not path or not Path(path).is_file()]
    if not 1 <= r.eject_after <= 100:
        problems.append("remote_workers.eject_after must be 1..100")
    if not 1 <= r.max_ejection_s <= 3600:
        problems.append("remote_workers.max_ejection_s must be 1..3600")
    if not 16 <= r.answers_in_flight_mb <= 1 << 20:
        problems.append("remote_workers.answers_in_flight_mb must be 16..1048576")
    if not re.fullmatch(r"spiffe://[^/]+/\S+/", r.identity):  # a path below the trust domain, ending a segment
        problems.append(f"remote_workers.identity: {r.identity!r} must be a SPIFFE ID prefix ending in '/' "
                        "(spiffe://gateway.local/worker/)")
    return problems


def _identity_checks(cfg: Config) -> list[Check]:
    a, iss = cfg.auth, cfg.issuer
    checks = [
        (0 <= a.leeway_s <= 300, "auth.leeway_s must be 0..300"),
        (60 <= iss.token_ttl_s <= 86400, "issuer.token_ttl_s must be 60..86400"),
        (1 <= iss.max_failed_logins <= 100 and 1 <= iss.max_failed_otp <= 100,
         "issuer.max_failed_logins and issuer.max_failed_otp must be 1..100 (NIST SP 800-63B)"),
        (iss.lockout_s >= 1, "issuer.lockout_s must be positive"),
        (0 <= iss.sign_in_threads <= 64, "issuer.sign_in_threads must be 0..64 (0: half the cores)"),
        (bool(iss.enabled or a.issuers or not a.require_token),
         "no token issuer: enable [issuer] or add [[auth.issuers]]"),
        (_safe_url(cfg.issuer_url), "issuer.url must be https://"),
    ]
    for t in a.issuers:
        where = f"auth.issuers[{t.issuer}]"
        checks += [
            (_safe_url(t.issuer), f"{where}.issuer must be https:// (http:// only on loopback)"),
            (not t.jwks_uri or _safe_url(t.jwks_uri), f"{where}.jwks_uri must be https:// (http:// only on loopback)"),
            (bool(t.algorithms) and set(t.algorithms) <= set(ALGORITHMS),
             f"{where}.algorithms must be a non-empty subset of {list(ALGORITHMS)}"),
            (t.jwks_ttl_s > 0 and t.jwks_refresh_s > 0, f"{where}: jwks_ttl_s and jwks_refresh_s must be positive"),
            (not t.ca_file or Path(t.ca_file).is_file(), f"{where}.ca_file: {t.ca_file} does not exist"),
        ]
    return checks


def _events_checks(cfg: Config) -> list[Check]:
    e = cfg.events
    if not e.webhook_url:
        return []
    return [
        (_safe_url(e.webhook_url), "events.webhook_url must be https:// (http:// only on loopback)"),
        (bool(e.webhook_secret_file) and Path(e.webhook_secret_file).is_file(),
         f"events.webhook_secret_file: {e.webhook_secret_file or '(not set)'} does not exist; the webhook's "
         "bodies are signed with it (`gateway init` makes one)"),
        (not e.webhook_ca_file or Path(e.webhook_ca_file).is_file(), f"events.webhook_ca_file: {e.webhook_ca_file} does not exist"),
        (1 <= e.batch_size <= e.queue_size <= 1_000_000, "events: 1 <= batch_size <= queue_size <= 1000000"),
        (1 <= e.retry_window_s <= 86400 and 0 < e.timeout_s <= 60, "events.retry_window_s must be 1..86400 and timeout_s 0..60"),
    ]


def _policy_checks(cfg: Config) -> list[Check]:
    p = cfg.rbac
    checks: list[Check] = []
    for rule in p.rules:
        for verb in rule.verbs:
            checks.append((any(fnmatch.fnmatchcase(v, verb) for v in VERBS),
                           f"{rule.name}: verb {verb!r} matches none of {list(VERBS)}"))
        checks.append((bool(rule.roles), f"{rule.name}: roles must not be empty"))
    for step in p.step_up:
        checks += [
            (not step.acr_min or step.acr_min in p.acr_order, f"{step.name}.acr_min {step.acr_min!r} is not in rbac.acr_order"),
            (step.max_age_s >= 0, f"{step.name}.max_age_s must be >= 0"),
            (bool(step.amr_any or step.acr_min or step.max_age_s), f"{step.name}: requires nothing (set amr_any, acr_min or max_age_s)"),
        ]
        for verb in step.verbs:
            checks.append((any(fnmatch.fnmatchcase(v, verb) for v in VERBS),
                           f"{step.name}: verb {verb!r} matches none of {list(VERBS)}"))
    names = [r.name for r in p.rules] + [r.name for r in p.step_up]
    checks.append((len(names) == len(set(names)), "rbac: rule names must be unique"))
    return checks


def _limit_checks(cfg: Config) -> list[Check]:
    lim = cfg.limits
    checks: list[Check] = []
    for key in ("per_address", "per_principal", "per_principal_model", "global_limit", "failed_auth_per_address",
                "per_address_probes", "budget_inferences", "budget_rows", "per_principal_explain"):
        text = getattr(lim, key)
        try:
            if text:
                limits_lib.parse_many(text)
        except ValueError:
            checks.append((False, f'limits.{key}: {text!r} is not a limit such as "100/minute" or "10/second;500/hour"'))
    return checks + [
        (lim.storage.split("://")[0] in ("memory", "redis", "rediss"), "limits.storage must be memory://, redis:// or rediss://"),
        (0 < lim.storage_timeout_s <= 10 and lim.storage_retry_s > 0, "limits: storage_timeout_s must be 0..10, storage_retry_s positive"),
    ]


def _trusted_key_checks(cfg: Config) -> list[Check]:
    return [(Path(key).is_file(), f"supply.trusted_keys: {key} does not exist (run `gateway init`)")
            for key in (cfg.supply.trusted_keys if cfg.supply.require_signature else ())]


def _key_checks(cfg: Config) -> list[Check]:
    """The audit log's and the models' keys, and the audit settings."""
    a = cfg.audit
    return _trusted_key_checks(cfg) + [
        (a.checkpoint_every >= 1 and a.checkpoint_interval_s > 0, "audit: checkpoint_every and checkpoint_interval_s must be positive"),
        (a.max_file_bytes >= 4096 and a.rotate_interval_s > 0, "audit: max_file_bytes must be >= 4096, rotate_interval_s positive"),
        (0 <= a.flush_window_ms <= 1000, "audit.flush_window_ms must be 0..1000"),
        (a.durability in ("process", "fsync"), "audit.durability must be \"process\" or \"fsync\""),
        (re.fullmatch(r"[A-Za-z0-9_-]{0,63}", a.replica) is not None,
         "audit.replica must be at most 63 letters, digits, '-' or '_' (it names the audit streams)"),
        (1 <= a.fsync_interval_ms <= 60_000, "audit.fsync_interval_ms must be 1..60000"),
        (0 < a.probe_summary_s <= 3600, "audit.probe_summary_s must be 0..3600"),
        (not a.enabled or Path(a.signing_key).is_file(), f"audit.signing_key: {a.signing_key} does not exist (run `gateway init`)"),
    ]


def check_ranges(cfg: Config, problems: list[str]) -> None:
    """Every value out of range, every file missing, every inconsistency, into ``problems``."""
    areas = (_server_checks, _identity_checks, _policy_checks, _limit_checks, _key_checks, _events_checks)
    # A worker host authenticates no callers and keeps no audit log: its server and its models' keys.
    for area in areas if not cfg.is_worker_host else (_server_checks, _trusted_key_checks):
        problems.extend(msg for ok, msg in area(cfg) if not ok)
    for m in cfg.models:
        if "throttle" in (m.guard.action, *(a for _, a in m.guard.roles)) and not cfg.limits.budget_inferences:
            problems.append(f"models.{m.name}.guard: throttle counts against limits.budget_inferences, which is not set")
        if "throttle" in (m.extraction.action, *(a for _, a in m.extraction.roles)) and not cfg.limits.budget_inferences:
            problems.append(f"models.{m.name}.extraction: throttle counts against limits.budget_inferences, "
                            "which is not set")
    if cfg.server.worker_uid_base and not 1000 <= cfg.server.worker_uid_base <= 2**31 - 1 - 4096:
        problems.append("server.worker_uid_base must be 0 or a user id of 1000 or more")
    if cfg.server.worker_user:
        try:
            pwd.getpwnam(cfg.server.worker_user)
        except KeyError:
            problems.append(f"server.worker_user: no user named {cfg.server.worker_user!r} on this system")
    helper = cfg.server.worker_exec
    if helper and not (os.path.isfile(helper) and os.access(helper, os.X_OK)):
        problems.append(f"server.worker_exec: {helper} is not an executable file")
    elif helper and not cfg.server.worker_user:
        problems.append('server.worker_exec needs server.worker_user (the workers\' group)')
    if not 1 <= cfg.tls.xfcc_hops <= 8:
        problems.append("tls.xfcc_hops must be 1..8")
    for proxy in cfg.tls.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            problems.append(f"tls.trusted_proxies: {proxy!r} is not an address or network")


def crl_problems(files: tuple[str, ...]) -> list[str]:
    from cryptography import x509

    out = []
    for name in files:
        try:
            data = Path(name).read_bytes()
            x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
        except OSError as exc:
            out.append(f"tls.crl_files: {name}: {exc.strerror or exc}")
        except ValueError:
            out.append(f"tls.crl_files: {name} is not a certificate revocation list (PEM or DER)")
    return out


def _safe_url(url: str) -> bool:
    """https://, or http:// to a loopback host (nothing off the machine can tamper with it)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")
