"""Reading the configuration: the TOML file, ``GATEWAY__SECTION__KEY`` overrides, each section into
its typed class (``gateway.config``), relative paths resolved against the file's directory, then
the checks (``gateway.configchecks``); every problem is collected and reported together."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from gateway.config import (
    AuditConfig,
    AuthConfig,
    Config,
    ConfigError,
    EventsConfig,
    IssuerConfig,
    IssuerTrust,
    LimitsConfig,
    PolicyConfig,
    RemoteWorkersConfig,
    RuleConfig,
    ServerConfig,
    StepUpRule,
    SupplyConfig,
    TLSConfig,
    WorkerHostConfig,
)
from gateway.modelconfig import coerce as _coerce
from gateway.modelconfig import parse_model

__all__ = ["load_config"]


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


def _tables(raw: Any, where: str, problems: list[str]) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        problems.append(f"{where}: expected an array of tables ([[{where}]])")
        return []
    return raw


def _required(cls: type, kwargs: dict[str, Any], where: str, problems: list[str], *names: str) -> bool:
    missing = [n for n in names if n not in kwargs]
    for n in missing:
        problems.append(f"{where}.{n}: required")
    return not missing


def _auth(raw: dict[str, Any], base: Path, problems: list[str]) -> AuthConfig:
    raw = dict(raw)
    issuers = []
    for i, table in enumerate(_tables(raw.pop("issuers", []), "auth.issuers", problems)):
        kwargs = _coerce(IssuerTrust, table, f"auth.issuers[{i}]", problems)
        if _required(IssuerTrust, kwargs, f"auth.issuers[{i}]", problems, "issuer"):
            trust = IssuerTrust(**kwargs)
            issuers.append(dataclasses.replace(trust, ca_file=_resolve(base, trust.ca_file)))
    roles = raw.pop("certificate_roles", {})
    mapping = []
    if not isinstance(roles, dict):
        problems.append("auth.certificate_roles: expected a table of identity = [roles]")
    else:
        for identity, names in roles.items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                problems.append(f"auth.certificate_roles.{identity!r}: expected a list of role names")
            elif not identity.startswith(("URI:", "DNS:", "email:", "subject:")):
                problems.append(f"auth.certificate_roles.{identity!r}: start with URI:, DNS:, email: or subject:")
            else:
                mapping.append((identity, tuple(names)))
    auth = AuthConfig(**_coerce(AuthConfig, raw, "auth", problems))
    return dataclasses.replace(auth, issuers=tuple(issuers), certificate_roles=tuple(mapping))


def _policy(raw: dict[str, Any], problems: list[str]) -> PolicyConfig:
    raw = dict(raw)
    rules, step_up = [], []
    for i, table in enumerate(_tables(raw.pop("rules", []), "rbac.rules", problems)):
        kwargs = _coerce(RuleConfig, {"name": f"rbac.rules[{i}]", **table}, f"rbac.rules[{i}]", problems)
        if _required(RuleConfig, kwargs, f"rbac.rules[{i}]", problems, "roles", "verbs"):
            rules.append(RuleConfig(**kwargs))
    for i, table in enumerate(_tables(raw.pop("step_up", []), "rbac.step_up", problems)):
        kwargs = _coerce(StepUpRule, {"name": f"rbac.step_up[{i}]", **table}, f"rbac.step_up[{i}]", problems)
        step_up.append(StepUpRule(**kwargs))
    policy = PolicyConfig(**_coerce(PolicyConfig, raw, "rbac", problems))
    return dataclasses.replace(policy, rules=tuple(rules), step_up=tuple(step_up))


def _events(raw: dict[str, Any], base: Path, problems: list[str]) -> EventsConfig:
    events = EventsConfig(**_coerce(EventsConfig, raw, "events", problems))
    return dataclasses.replace(events, webhook_secret_file=_resolve(base, events.webhook_secret_file),
                               webhook_ca_file=_resolve(base, events.webhook_ca_file))


def _resolve(base: Path, value: str) -> str:
    return value if not value or Path(value).is_absolute() else str((base / value).resolve())


def _remote_workers(raw: Any, base: Path, tls: TLSConfig, problems: list[str]) -> RemoteWorkersConfig:
    remote = RemoteWorkersConfig(**_coerce(RemoteWorkersConfig, raw, "remote_workers", problems))
    return dataclasses.replace(remote, cert_file=_resolve(base, remote.cert_file), key_file=_resolve(base, remote.key_file),
                               ca_file=_resolve(base, remote.ca_file) if remote.ca_file else tls.client_ca_file)


def _limits_with_password(limits: LimitsConfig, base: Path, problems: list[str]) -> LimitsConfig:
    """``limits.storage_password_file``'s password, URL-quoted into ``limits.storage``."""
    if not limits.storage_password_file:
        return limits
    from urllib.parse import quote, urlsplit, urlunsplit

    path = _resolve(base, limits.storage_password_file)
    url = urlsplit(limits.storage)
    if url.scheme not in ("redis", "rediss"):
        problems.append("limits.storage_password_file needs a redis:// or rediss:// limits.storage")
        return limits
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        problems.append(f"limits.storage_password_file: {exc.strerror or exc}: {path}")
        return limits
    user = url.username or ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{url.hostname or ''}" + (f":{url.port}" if url.port else "")
    return dataclasses.replace(limits, storage=urlunsplit((url.scheme, netloc, url.path, url.query, url.fragment)),
                               storage_password_file=path)


def load_config(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> Config:
    """Load, override from the environment, validate and freeze. Raises ``ConfigError``."""
    problems: list[str] = []
    data, base = _read(path)
    _env_overrides(data, dict(os.environ if environ is None else environ))
    for section in set(data) - {"server", "tls", "models", "auth", "issuer", "rbac", "limits", "audit", "supply", "events",
                                  "remote_workers", "worker_host"}:
        problems.append(f"[{section}]: unknown section")
    cfg = _sections(data, base, str(path or ""), problems)
    _check_files(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], Path]:
    """The TOML document at ``path`` (nothing when None) and the folder its relative paths start from."""
    if path is None:
        return {}, Path.cwd()
    p = Path(path)
    try:
        return tomllib.loads(p.read_text()), p.resolve().parent
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file (create one with `gateway init`)"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{p}: a folder, not a configuration file (is a volume mounted over it?)"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: {exc}"]) from None


def _sections(data: dict[str, Any], base: Path, source: str, problems: list[str]) -> Config:
    """Each section typed, its paths resolved against ``base``; what is wrong goes to ``problems``."""
    server = ServerConfig(**_coerce(ServerConfig, data.get("server", {}), "server", problems))
    server = dataclasses.replace(server, pid_file=_resolve(base, server.pid_file))
    tls = TLSConfig(**_coerce(TLSConfig, data.get("tls", {}), "tls", problems))
    tls = dataclasses.replace(
        tls,
        cert_file=_resolve(base, tls.cert_file),
        key_file=_resolve(base, tls.key_file),
        client_ca_file=_resolve(base, tls.client_ca_file),
        crl_files=tuple(_resolve(base, f) for f in tls.crl_files),
    )
    models_raw = dict(data.get("models", {}))
    root = models_raw.pop("root", "models")
    models = [dataclasses.replace(m, kek_file=_resolve(base, m.kek_file))
              for name, table in models_raw.items() if (m := parse_model(name, table, problems)) is not None]
    auth = _auth(data.get("auth", {}), base, problems)
    issuer = IssuerConfig(**_coerce(IssuerConfig, data.get("issuer", {}), "issuer", problems))
    issuer = dataclasses.replace(issuer, directory=_resolve(base, issuer.directory),
                                 incidents_file=_resolve(base, issuer.incidents_file))
    rbac = _policy(data.get("rbac", {}), problems)
    limits = _limits_with_password(LimitsConfig(**_coerce(LimitsConfig, data.get("limits", {}), "limits", problems)),
                                   base, problems)
    audit = AuditConfig(**_coerce(AuditConfig, data.get("audit", {}), "audit", problems))
    audit = dataclasses.replace(audit, directory=_resolve(base, audit.directory),
                                signing_key=_resolve(base, audit.signing_key), public_key=_resolve(base, audit.public_key))
    supply = SupplyConfig(**_coerce(SupplyConfig, data.get("supply", {}), "supply", problems))
    supply = dataclasses.replace(supply, kek_file=_resolve(base, supply.kek_file),
                                 signing_key=_resolve(base, supply.signing_key),
                                 trusted_keys=tuple(_resolve(base, k) for k in supply.trusted_keys))
    return Config(server, tls, _resolve(base, str(root)), tuple(models), source, auth, issuer, rbac, limits,
                  audit, supply, _events(data.get("events", {}), base, problems),
                  _remote_workers(data.get("remote_workers", {}), base, tls, problems),
                  WorkerHostConfig(**_coerce(WorkerHostConfig, data.get("worker_host", {}), "worker_host", problems)),
                  "worker_host" in data)


def _check_files(cfg: Config, problems: list[str]) -> None:
    """The ranges, and the files the configuration names that must exist before anything starts."""
    from gateway.configchecks import check_ranges, crl_problems, remote_worker_problems  # they read the classes above

    check_ranges(cfg, problems)
    if not cfg.models:
        problems.append("models: no model is configured (add a [models.NAME] table)")
    tls = cfg.tls
    for name in ("cert_file", "key_file") + (("client_ca_file",) if tls.client_auth != "off" else ()):
        if not Path(getattr(tls, name)).is_file():
            problems.append(f"tls.{name}: {getattr(tls, name)} does not exist (run `gateway init`)")
    problems.extend(crl_problems(tls.crl_files))
    problems.extend(remote_worker_problems(cfg))
