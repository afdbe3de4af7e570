"""One typed, frozen configuration: a TOML file plus ``GATEWAY__SECTION__KEY`` environment overrides.

Validated at start-up; every error is collected and reported together. Relative paths are
resolved against the configuration file's directory. Secure by default: weakening a setting
(``client_auth = "optional"``, ``min_version = "1.2"``, trusted proxies) must be spelled out, and
``insecure_settings()`` lists every such choice for the self-audit.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

__all__ = ["Config", "ConfigError", "ModelConfig", "ServerConfig", "TLSConfig", "load_config"]

ClientAuth = Literal["required", "optional", "off"]
TLSVersion = Literal["1.3", "1.2"]
Device = Literal["auto", "cuda", "cpu"]


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
    keepalive_timeout_s: float = 5.0
    limit_concurrency: int = 2048
    """Connections plus in-flight requests per process before 503."""
    backlog: int = 2048
    runtime_dir: str = ""
    """Directory for worker sockets; empty means a fresh private (0700) temporary directory."""
    probe_port: int = 0
    """Plain-HTTP listener serving only /v2/health/live and /ready for probes; 0 disables it."""
    probe_host: str = "127.0.0.1"
    worker_user: str = "nobody"
    """When the gateway runs as root, workers drop to this user; "" keeps them as root (reported)."""
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


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str = "1"
    workers: int = 1
    device: Device = "auto"
    """"cuda" fails loudly when the CUDA execution provider is not active."""
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    intra_op_threads: int = 1
    memory_limit_mb: int = 0
    """Address-space limit for each worker process; 0 means none (CUDA reserves a lot)."""
    max_inflight: int = 256
    """Requests queued or running per worker before 503 with Retry-After."""
    batch_buckets: str = "auto"
    """Pad batches to these sizes ("8,16"); "auto" = max_batch_size on CUDA, none on CPU; "off"."""
    cuda_tf32: bool = False
    """Allow TF32 matrix maths on CUDA: faster, but outputs drift from the CPU's by ~1e-3."""


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    models_root: str = "models"
    models: tuple[ModelConfig, ...] = ()
    source: str = ""

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
        if self.server.debug:
            out.append("server.debug = true: internal error details reach clients")
        if self.server.probe_port and self.server.probe_host not in ("127.0.0.1", "::1", "localhost"):
            out.append(f"server.probe_host = {self.server.probe_host!r}: plain-HTTP probes reachable off-host")
        return out

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def _coerce(cls: type, raw: dict[str, Any], where: str, problems: list[str]) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            problems.append(f"{where}.{key}: unknown setting")
            continue
        hint = hints[key]
        if get_origin(hint) is Literal:
            if value not in get_args(hint):
                problems.append(f"{where}.{key}: {value!r} is not one of {list(get_args(hint))}")
                continue
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif get_origin(hint) is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"{where}.{key}: expected a list of strings")
                continue
            value = tuple(value)
        elif not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            problems.append(f"{where}.{key}: expected {hint.__name__}, got {type(value).__name__}")
            continue
        kwargs[key] = value
    return kwargs


def _env_overrides(data: dict[str, Any], environ: dict[str, str]) -> None:
    """``GATEWAY__TLS__CLIENT_AUTH=optional`` sets ``[tls] client_auth``; values parse as TOML."""
    for name, text in environ.items():
        if not name.startswith("GATEWAY__"):
            continue
        path = [p.lower() for p in name[len("GATEWAY__"):].split("__")]
        try:
            value: Any = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value


def _check_ranges(cfg: Config, problems: list[str]) -> None:
    s = cfg.server
    checks = [
        (1 <= s.port <= 65535, "server.port must be 1..65535"),
        (0 <= s.probe_port <= 65535, "server.probe_port must be 0..65535"),
        (1 <= s.processes <= 64, "server.processes must be 1..64"),
        (s.request_timeout_s > 0, "server.request_timeout_s must be positive"),
        (s.max_body_bytes >= 1024, "server.max_body_bytes must be at least 1024"),
    ]
    for m in cfg.models:
        where = f"models.{m.name}"
        checks += [
            (1 <= m.workers <= 64, f"{where}.workers must be 1..64"),
            (1 <= m.max_batch_size <= 4096, f"{where}.max_batch_size must be 1..4096"),
            (0 <= m.max_queue_delay_ms <= 1000, f"{where}.max_queue_delay_ms must be 0..1000"),
            (m.intra_op_threads >= 0, f"{where}.intra_op_threads must be >= 0"),
            (m.max_inflight >= 1, f"{where}.max_inflight must be >= 1"),
            (m.batch_buckets in ("auto", "off") or all(p.strip().isdigit() and int(p) > 0 for p in m.batch_buckets.split(",")),
             f'{where}.batch_buckets must be "auto", "off" or comma-separated sizes'),
        ]
    checks.append((not (s.probe_port and s.processes > 1),
                   "server.probe_port needs server.processes = 1 (probes are not served per process yet)"))
    problems.extend(msg for ok, msg in checks if not ok)
    if s.worker_user:
        try:
            pwd.getpwnam(s.worker_user)
        except KeyError:
            problems.append(f"server.worker_user: no user named {s.worker_user!r} on this system")
    for proxy in cfg.tls.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            problems.append(f"tls.trusted_proxies: {proxy!r} is not an address or network")


def _resolve(base: Path, value: str) -> str:
    return value if not value or Path(value).is_absolute() else str((base / value).resolve())


def load_config(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> Config:
    """Load, override from the environment, validate and freeze. Raises ``ConfigError``."""
    problems: list[str] = []
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        base = p.resolve().parent
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError([f"{p}: no such file (create one with `gateway init`)"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{p}: {exc}"]) from None
    _env_overrides(data, dict(os.environ if environ is None else environ))
    for section in set(data) - {"server", "tls", "models"}:
        problems.append(f"[{section}]: unknown section")
    server = ServerConfig(**_coerce(ServerConfig, data.get("server", {}), "server", problems))
    tls = TLSConfig(**_coerce(TLSConfig, data.get("tls", {}), "tls", problems))
    tls = dataclasses.replace(
        tls,
        cert_file=_resolve(base, tls.cert_file),
        key_file=_resolve(base, tls.key_file),
        client_ca_file=_resolve(base, tls.client_ca_file),
    )
    models_raw = dict(data.get("models", {}))
    root = models_raw.pop("root", "models")
    models = []
    for name, table in models_raw.items():
        if not isinstance(table, dict):
            problems.append(f"models.{name}: expected a table")
            continue
        models.append(ModelConfig(name=name, **_coerce(ModelConfig, table, f"models.{name}", problems)))
    cfg = Config(server, tls, _resolve(base, str(root)), tuple(models), str(path or ""))
    _check_ranges(cfg, problems)
    if not cfg.models:
        problems.append("models: no model is configured (add a [models.NAME] table)")
    for name in ("cert_file", "key_file") + (("client_ca_file",) if tls.client_auth != "off" else ()):
        if not Path(getattr(tls, name)).is_file():
            problems.append(f"tls.{name}: {getattr(tls, name)} does not exist (run `gateway init`)")
    if problems:
        raise ConfigError(problems)
    return cfg
