"""One typed, frozen configuration: a TOML file plus ``GATEWAY__SECTION__KEY`` environment overrides.

Validated at start-up (the checks are in ``gateway.configchecks``); every error is collected and
reported together. Relative paths are resolved against the configuration file's directory.
Secure by default: weakening a setting (``client_auth = "optional"``, ``min_version = "1.2"``,
trusted proxies) must be spelled out, and ``insecure_settings()`` lists every such choice for the
self-audit.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

from gateway.identityconfig import (  # re-exported: identity is part of the configuration
    ACR_MFA,
    ACR_PASSWORD,
    ALGORITHMS,
    VERBS,
    AuthConfig,
    IssuerConfig,
    IssuerTrust,
    PolicyConfig,
    RuleConfig,
    StepUpRule,
)
from gateway.modelconfig import (  # re-exported: the model sections are part of the configuration
    EXTRACTION_ACTIONS,
    EXTRACTION_SIGNALS,
    GUARD_ACTIONS,
    OUTPUT_POLICIES,
    ExtractionConfig,
    GuardConfig,
    ModelConfig,
    OutputConfig,
)
from gateway.remoteconfig import RemoteWorkersConfig, WorkerHostConfig
from gateway.units import Unit

__all__ = [
    "ACR_MFA", "ACR_PASSWORD", "ALGORITHMS", "VERBS",
    "EXTRACTION_ACTIONS", "EXTRACTION_SIGNALS", "GUARD_ACTIONS", "OUTPUT_POLICIES", "AuditConfig", "AuthConfig",
    "Config", "ConfigError", "EventsConfig", "ExtractionConfig", "GuardConfig", "IssuerConfig", "IssuerTrust",
    "LimitsConfig", "ModelConfig", "OutputConfig", "PolicyConfig", "RemoteWorkersConfig", "RuleConfig", "ServerConfig",
    "StepUpRule", "WorkerHostConfig",
    "SupplyConfig", "TLSConfig", "load_config",
]

ClientAuth = Literal["required", "optional", "off"]
TLSVersion = Literal["1.3", "1.2"]


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to listen on (HTTPS only)."""
    port: int = 8443
    processes: int = 1
    """Serving (HTTP) processes, each with its own SO_REUSEPORT socket on the same port."""
    request_timeout_s: float = 30.0
    """Per-request deadline for the worker round trip; past it the answer is 504."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest accepted request body (413 above it, checked while streaming)."""
    max_bytes_elements: int = 65536
    """BYTES (text) elements in one inference request, all inputs together (400 above it, from the
    shapes, before any data is read): each costs microseconds of Python work where a number costs
    nanoseconds, so a 32 MiB body of empty strings would otherwise hold the gateway for seconds."""
    max_inflight_body_bytes: int = 512 * 1024 * 1024
    """Request-body bytes one serving process holds at once, all requests together (503 above it)."""
    max_inflight_body_bytes_per_principal: int = 96 * 1024 * 1024
    """... and for one principal (429 above it): slow large uploads cannot pile up."""
    decode_processes: int = 0
    """Processes that decode bodies over 64 KiB, per serving process; 0 means half the CPUs (1 to 4)."""
    decode_memory_mb: int = 4096
    """Address space each decoder process may use; a body that needs more to decode is refused (413)."""
    keepalive_timeout_s: float = 20.0
    """An idle connection is closed after this. Keep it above the idle expiry of your clients'
    connection pools (httpx 5 s, aiohttp 15 s): a pool that reuses a connection just as the gateway
    closes it sees "server disconnected" on a request the gateway never read."""
    handshake_timeout_s: float = 5.0
    """A connection must complete its TLS handshake within this, or it is closed."""
    header_timeout_s: float = 10.0
    """The request line and headers must arrive within this (408 and close otherwise: Slowloris)."""
    body_timeout_s: float = 30.0
    """The whole body must arrive within this after the headers."""
    write_timeout_s: float = 30.0
    """A client that reads none of its answers for this long (writes stalled) is disconnected."""
    max_connections: int = 10_000
    """Client connections per serving process, established and in their handshake (Envoy's edge
    default); lowered at start-up to what the file-descriptor limit allows."""
    max_pending_handshakes: int = 1024
    """Connections in their TLS handshake at once per serving process; more are closed at once."""
    max_pending_handshakes_per_address: int = 256
    """... and from one client address."""
    max_connections_per_address: int = 256
    """Connections from one client address, established and in their handshake (nginx's
    ``limit_conn``): one client's kept-alive connections cannot take every place under
    ``limit_concurrency``. 0: no such limit. The trusted proxies (``tls.trusted_proxies``) have none."""
    limit_concurrency: int = 2048
    """Connections plus in-flight requests per process before 503."""
    backlog: int = 2048
    runtime_dir: str = ""
    """Directory for worker sockets; empty means a fresh private (0700) temporary directory."""
    probe_port: int = 0
    """Plain-HTTP listener serving only /v2/health/live and /ready for probes; 0 disables it."""
    probe_host: str = "127.0.0.1"
    pid_file: str = "gateway.pid"
    """Where ``gateway serve`` writes its process id (``gateway models reload`` signals it)."""
    worker_user: str = "nobody"
    """When the gateway runs as root, workers drop to this user's group; "" keeps them as root (reported)."""
    worker_uid_base: int = 61184
    """When the gateway runs as root, each worker gets a user id of its own from this one up (systemd's
    range for dynamic users), so that no worker can signal or trace another; 0 gives every worker
    ``worker_user``'s id (reported)."""
    ready_when: Literal["all", "any"] = "all"
    """``/v2/health/ready`` answers 200 when every model has a healthy worker ("all"), or when one
    has ("any": a replica whose one model's workers are away stays in rotation for the others,
    which readiness lists under ``degraded.models``)."""
    worker_exec: str = ""
    """When the gateway does not run as root: a set-user-ID helper (the image's
    ``/usr/local/libexec/gateway/worker-exec``) that starts each worker as a user of its own from
    ``worker_uid_base`` and ``worker_user``'s group. Empty: workers run as the gateway's user (reported)."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    debug: bool = False
    """Show internal error details to clients. Never in production."""


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str = "certs/server.pem"
    key_file: str = "certs/server.key"
    client_ca_file: str = "certs/ca.pem"
    client_auth: ClientAuth = "required"
    """mTLS: "required" (default), "optional" or "off"."""
    min_version: TLSVersion = "1.3"
    """TLS 1.3 only by default; "1.2" also admits TLS 1.2 with ECDHE and AEAD ciphers."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks whose X-Forwarded-Client-Cert header is honoured."""
    xfcc_hops: int = 1
    """Trusted proxies that each append to X-Forwarded-Client-Cert: the client's element is this many
    from the end (1: the one the nearest proxy added; right for proxies that set the header too)."""
    crl_files: tuple[str, ...] = ()
    """Certificate revocation lists (PEM or DER) of the client CAs: a revoked client certificate fails
    the handshake (alert ``certificate_revoked``). With any, every client CA needs a current CRL.
    Reloaded when a file changes."""


@dataclass(frozen=True)
class EventsConfig:
    """``[events]``: security events (detections) delivered to a webhook, besides the audit log."""

    webhook_url: str = ""
    """https:// (or http:// to loopback); empty: events go to the audit log and metrics only."""
    webhook_secret_file: str = ""
    """The HMAC-SHA256 key the body is signed with (``Gateway-Signature: t=..., v1=...``)."""
    webhook_ca_file: str = ""
    queue_size: int = 10000
    """Events waiting for delivery; beyond it new ones are dropped (and counted; the audit log keeps them)."""
    batch_size: int = 100
    retry_window_s: float = 300.0
    """How long a batch is retried (exponential backoff, 0.5 s doubling to 30 s) before it is given up."""
    timeout_s: float = 5.0


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: rate limits and query budgets, in slowapi's notation ("100/minute", "10/second;500/hour")."""

    storage: str = "memory://"
    """``memory://`` (each serving process counts alone) or ``redis://`` / ``rediss://`` (shared by replicas)."""
    strategy: Literal["sliding-window", "moving-window", "fixed-window"] = "sliding-window"
    per_address: str = "1200/minute"
    """Per client address, before authentication; "" switches it off."""
    per_principal: str = "600/minute"
    per_principal_model: str = ""
    global_limit: str = ""
    """All requests of this gateway (all replicas with Redis) together."""
    failed_auth_per_address: str = "30/minute"
    """Refused credentials per client address; past it even good ones wait."""
    per_address_probes: str = "20/second"
    """Health probes per client address, counted in this process's memory only (probes stay cheap
    and keep answering while Redis is down); "" switches it off."""
    budget_inferences: str = "100000/day"
    """Inference requests per principal and model (the first line against model extraction)."""
    budget_rows: str = "1000000/day"
    """Input rows (the batch dimension) per principal and model."""
    per_principal_explain: str = "10/minute"
    """Explanations per principal and model (each also costs its model evaluations in both budgets)."""
    admission: Literal["concurrent", "before"] = "concurrent"
    """With Redis, when an inference's limits are counted: ``concurrent`` sends its inputs to the
    worker while the round trip to Redis runs, and answers only once it is admitted (a refused
    request's outputs are discarded; the refusals a replica remembers stop the next ones before
    any work); ``before`` waits for Redis first (a refused request never reaches a worker, at the
    cost of that round trip in every inference's latency)."""
    storage_password_file: str = ""
    """A file holding Redis's password (a mounted Secret), put into ``storage``'s URL at load, so
    that the password need not be in the configuration or the environment."""
    storage_timeout_s: float = 0.25
    """A Redis call slower than this counts as a failure: local limits apply meanwhile."""
    storage_retry_s: float = 5.0
    """How often a failed Redis is tried again."""

    @property
    def shared(self) -> bool:
        """Counted in Redis, shared by every serving process and replica."""
        return self.storage.startswith(("redis://", "rediss://"))


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: the tamper-evident record of every request."""

    enabled: bool = True
    directory: str = "audit"
    """One subdirectory per serving process (stream) of JSON-lines files."""
    signing_key: str = "keys/audit-signing.key"
    """Ed25519 private key for checkpoints (``gateway init`` makes it); keep it apart from the log."""
    public_key: str = "keys/audit-signing.pub"
    """What ``gateway audit verify`` checks checkpoints against."""
    checkpoint_every: int = 1000
    checkpoint_interval_s: float = 60.0
    max_file_bytes: int = 64 * 1024 * 1024
    rotate_interval_s: float = 86400.0
    replica: str = ""
    """This gateway's name among replicas that share one audit directory (a pod's name, from the
    Downward API): its streams are ``<replica>-p0``, ``<replica>-supervisor``..., so replicas never
    contend for a stream. Empty: ``p0``, ``supervisor``... (one gateway per directory)."""
    durability: str = "process"
    """When an answer may leave: ``process`` once its record is written to the file (it survives
    ``kill -9`` of any process; fsync follows within ``fsync_interval_ms``), or ``fsync`` once its
    record is also fsynced (it survives a power cut too, at one fsync per batch)."""
    fsync_interval_ms: float = 50.0
    """``process`` durability: the longest a written record waits for its fsync."""
    flush_window_ms: float = 0.0
    """``fsync`` durability: wait this long for more records before a batch's write and fsync (0: a
    batch is whatever arrived while the previous fsync ran)."""
    probe_summary_s: float = 60.0
    """Health probes are not recorded one by one: every this many seconds, one ``probes`` record
    counts them by path, status and client address."""
    fail_closed: bool = True
    """Answer 503 rather than serve a request that cannot be recorded; false is reported."""

    def stream(self, name: str) -> str:
        """The audit stream ``name`` (``p0``, ``supervisor``) of this replica."""
        return f"{self.replica}-{name}" if self.replica else name


@dataclass(frozen=True)
class SupplyConfig:
    """``[supply]``: what a model file must be before it is served (admission, encryption at rest)."""

    require_signature: bool = True
    """Refuse a model version unless ``model.sig`` verifies under one of ``trusted_keys``; false is reported."""
    trusted_keys: tuple[str, ...] = ("keys/model-signing.pub",)
    """EC public keys (PEM) whose model signatures are accepted."""
    signing_key: str = "keys/model-signing.key"
    """The EC private key ``gateway models sign`` uses by default (``gateway init`` makes one)."""
    kek_file: str = ""
    """Key-encryption key for sealed models: a file holding 32 random bytes (base64 or raw)."""
    kek_env: str = "GATEWAY_MODEL_KEK"
    """...or this environment variable (base64), when kek_file is empty."""
    kek_provider: str = ""
    """``module:Class`` of another key provider (a KMS, Vault): called with this section, it must offer
    ``kek_id()``, ``wrap(key)`` and ``unwrap(wrapped)``."""
    max_model_bytes: int = 4 * 1024**3
    max_nodes: int = 200_000
    max_initializer_bytes: int = 2 * 1024**3
    allowed_domains: tuple[str, ...] = ("", "ai.onnx", "ai.onnx.ml")
    """Operator domains a model may use; custom domains (native custom operators) are refused."""
    opset_min: int = 7
    opset_max: int = 25


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    models_root: str = "models"
    models: tuple[ModelConfig, ...] = ()
    source: str = ""
    auth: AuthConfig = field(default_factory=AuthConfig)
    issuer: IssuerConfig = field(default_factory=IssuerConfig)
    rbac: PolicyConfig = field(default_factory=PolicyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    supply: SupplyConfig = field(default_factory=SupplyConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    remote_workers: RemoteWorkersConfig = field(default_factory=RemoteWorkersConfig)
    worker_host: WorkerHostConfig = field(default_factory=WorkerHostConfig)
    is_worker_host: bool = False
    """The file has a ``[worker_host]`` section: it configures ``gateway worker serve``, which
    authenticates no callers (its settings for tokens, limits and RBAC are not checked)."""

    @property
    def issuer_url(self) -> str:
        if self.issuer.url:
            return self.issuer.url.rstrip("/")
        host = self.server.host
        host = "localhost" if host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::") else host
        return f"https://{host}:{self.server.port}"

    @property
    def audience(self) -> str:
        return self.auth.audience or self.issuer_url

    @property
    def state_per_process(self) -> bool:
        """Several serving processes without Redis: each counts limits, lockouts and one-time codes alone."""
        return self.server.processes > 1 and not self.limits.shared

    def insecure_settings(self) -> list[str]:
        out = []
        if self.tls.client_auth != "required":
            out.append(f'tls.client_auth = "{self.tls.client_auth}": client certificates are not required')
        if self.tls.min_version != "1.3":
            out.append('tls.min_version = "1.2": TLS 1.2 is accepted')
        if self.tls.trusted_proxies:
            out.append(f"tls.trusted_proxies = {list(self.tls.trusted_proxies)}: X-Forwarded-Client-Cert is trusted from them")
        if not self.server.worker_user and os.geteuid() == 0:
            out.append('server.worker_user = "": workers run as root')
        elif self.server.worker_uid_base == 0 and os.geteuid() == 0:
            out.append("server.worker_uid_base = 0: all workers share one user id and can signal each other")
        if self.server.debug:
            out.append("server.debug = true: internal error details reach clients")
        if self.server.probe_port and self.server.probe_host not in ("127.0.0.1", "::1", "localhost"):
            out.append(f"server.probe_host = {self.server.probe_host!r}: plain-HTTP probes reachable off-host")
        if self.limits.storage.startswith("redis://") and "@" not in self.limits.storage.split("/")[2] \
                and not self.limits.storage.startswith("redis://127.0.0.1") and not self.limits.storage.startswith("redis://localhost"):
            out.append("limits.storage: plain redis:// to another host (no TLS, no password); use rediss://")
        if self.state_per_process:
            out.append(f"server.processes = {self.server.processes} without Redis: each process counts limits, "
                       "lockouts and one-time codes alone")
        if not self.limits.per_address and not self.limits.per_principal:
            out.append("limits: neither per_address nor per_principal is limited")
        if not self.server.max_connections_per_address:
            out.append("server.max_connections_per_address = 0: one client may hold every connection")
        if not self.supply.require_signature:
            out.append("supply.require_signature = false: unsigned models are served")
        if not self.audit.enabled:
            out.append("audit.enabled = false: requests are not recorded")
        elif not self.audit.fail_closed:
            out.append("audit.fail_closed = false: requests are served even when they cannot be recorded")
        if not self.auth.require_token:
            out.append("auth.require_token = false: a client certificate alone can act with its certificate_roles")
        for trust in self.auth.issuers:
            if not trust.typ:
                out.append(f"auth.issuers[{trust.issuer}].typ = \"\": tokens of any type (ID tokens too) are accepted")
        return out

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def units(self) -> list[tuple[Unit, ModelConfig]]:
        """Every served unit with its settings; a pinned unit's ``version`` is its own."""
        out = []
        for m in self.models:
            out.append((Unit(m.name), m))
            out += [(Unit(m.name, v), dataclasses.replace(m, version=v, versions=()))
                    for v in dict.fromkeys(m.versions) if v != m.version]
        return out


def load_config(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> Config:
    """The configuration at ``path`` (None: every default) with ``environ``'s ``GATEWAY__`` overrides
    (default: this process's), checked and frozen; ``ConfigError`` lists every problem. Read by
    ``gateway.configload``, which needs the classes above."""
    from gateway.configload import load_config as load

    return load(path, environ)
