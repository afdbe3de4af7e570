"""Incident controls in force: revoked tokens, principals and client certificates, quarantined
model versions, and lockdown.

``Controls`` is one versioned snapshot of them (plain data: JSON in a file and in Redis).
``IncidentStore`` keeps the snapshot this process enforces, applies an operator's action to it, and
follows changes made anywhere else:

* persisted in ``incidents.json`` beside the built-in issuer's store (0600, replaced atomically,
  changes made under a lock file, so the serving processes of one gateway never lose each other's);
* with ``limits.storage`` on Redis, also in one Redis key, changed with optimistic transactions
  (``WATCH``/``MULTI``); every process polls the snapshot's version every ``POLL_S`` and takes a
  newer one, from Redis or the file, and writes it to its own file. An action is thus in force on
  every replica within about half a second, and survives a restart of any replica and the loss of
  Redis (the next action, or a start-up, puts the newest snapshot back).

When Redis is unreachable, the snapshot in force stays in force (nothing is lifted by an outage),
the process logs it once and reports it, and actions are refused with a reason (an action that
only one replica would enforce is not what an operator asked for).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.security.types import PeerIdentity, Principal

__all__ = ["ACTIONS", "Controls", "IncidentError", "IncidentStore"]

log = logging.getLogger("gateway.incidents")
POLL_S = 0.5
KEY = "gateway:incidents"
VERSION_KEY = "gateway:incidents:version"
ACTIONS = ("revoke-token", "revoke-principal", "reinstate-principal", "revoke-certificate", "reinstate-certificate",
           "quarantine", "release", "lockdown", "lift")


class IncidentError(ValueError):
    """An action that cannot be applied (malformed, or storage unreachable), with the reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Controls:
    version: int = 0
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Revoked access tokens by ``jti`` (kept until the token's expiry, ``until``)."""
    principals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Revoked principals by ``issuer|subject``: every token of theirs is refused, and the built-in
    issuer issues them none, until reinstated."""
    certificates: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Revoked client certificates by SHA-256 fingerprint (lowercase hex), or ``serial:`` and the
    serial number (lowercase hex)."""
    quarantined: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Model versions (``model/version``) answered 503 until released, whatever is reloaded."""
    lockdown: dict[str, Any] | None = None
    """When set: every request but the break-glass principals' gets 503."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Controls:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def counts(self) -> dict[str, int]:
        """How many of each kind are in force (``lockdown``: 1 or 0)."""
        return {"tokens": len(self.tokens), "principals": len(self.principals), "certificates": len(self.certificates),
                "quarantined": len(self.quarantined), "lockdown": int(self.lockdown is not None)}

    @property
    def empty(self) -> bool:
        return not (self.tokens or self.principals or self.certificates or self.quarantined or self.lockdown)

    # -- what a request meets ---------------------------------------------------------------------
    def refusal(self, principal: Principal | None, peer: PeerIdentity | None) -> str | None:
        """Why this caller's credentials are refused, or None."""
        if peer is not None and (peer.fingerprint_sha256.lower() in self.certificates
                                 or (peer.serial and f"serial:{peer.serial}" in self.certificates)):
            return "client certificate revoked"
        if principal is None:
            return None
        if principal.token_id is not None and principal.token_id in self.tokens:
            return "access token revoked"
        if principal.key in self.principals:
            return "principal revoked"
        return None

    def locked_out(self, principal: Principal | None) -> bool:
        if self.lockdown is None:
            return False
        allowed = self.lockdown.get("break_glass", [])
        return principal is None or not (principal.key in allowed or principal.subject in allowed)

    def quarantine_of(self, model: str, version: str) -> dict[str, Any] | None:
        return self.quarantined.get(f"{model}/{version}")

    # -- what an operator does --------------------------------------------------------------------
    def apply(self, action: str, params: dict[str, Any], by: str, reason: str, now: float | None = None) -> Controls:
        """A new snapshot with ``action`` applied (``IncidentError`` saying what is wrong otherwise)."""
        if action not in ACTIONS:
            raise IncidentError(f"unknown action {action!r}; one of {list(ACTIONS)}")
        if not reason.strip():
            raise IncidentError("a reason is required (it is kept in the audit log)")
        stamp = {"by": by, "reason": reason.strip()[:1000], "time": _now()}
        now = time.time() if now is None else now
        changes: dict[str, Any] = {}
        if action == "revoke-token":
            until = _expiry(params, now + 86400)
            tokens = {j: v for j, v in self.tokens.items() if v.get("until", 0) > now}  # expired ones go
            changes["tokens"] = {**tokens, _text(params, "jti"): {**stamp, "until": until}}
        elif action in ("revoke-principal", "reinstate-principal"):
            who = _text(params, "principal")
            changes["principals"] = _toggled(self.principals, who, stamp if action == "revoke-principal" else None)
        elif action in ("revoke-certificate", "reinstate-certificate"):
            key = _certificate_key(params)
            changes["certificates"] = _toggled(self.certificates, key, stamp if action == "revoke-certificate" else None)
        elif action in ("quarantine", "release"):
            unit = f"{_text(params, 'model')}/{_text(params, 'version')}"
            changes["quarantined"] = _toggled(self.quarantined, unit, stamp if action == "quarantine" else None)
        elif action == "lockdown":
            names = params.get("break_glass") or []
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise IncidentError('"break_glass" must be a list of principals (issuer|subject, or a subject)')
            changes["lockdown"] = {**stamp, "break_glass": sorted({*names, by})}  # never locks its operator out
        else:
            if self.lockdown is None:
                raise IncidentError("no lockdown is in force", 409)
            changes["lockdown"] = None
        return dataclasses.replace(self, version=self.version + 1, **changes)


def _text(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value or len(value) > 512:
        raise IncidentError(f'"{name}" is required (a string of at most 512 characters)')
    return value


def _expiry(params: dict[str, Any], default: float) -> float:
    """``expires_at``, the revoked token's ``exp`` (a Unix time), or ``default`` when not given."""
    value = params.get("expires_at")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IncidentError('"expires_at", when given, is the token\'s expiry as a Unix time (its "exp")')
    return float(value)


def _certificate_key(params: dict[str, Any]) -> str:
    """``sha256`` (64 hex digits) or ``serial`` (hex, as ``openssl x509 -serial`` prints it)."""
    if "serial" in params:
        serial = _text(params, "serial").lower().replace(":", "").removeprefix("0x").lstrip("0") or "0"
        if any(c not in "0123456789abcdef" for c in serial):
            raise IncidentError('"serial" must be the certificate\'s serial number in hex')
        return f"serial:{serial}"
    sha = _text(params, "sha256").lower().replace(":", "")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise IncidentError('"sha256" must be the certificate\'s SHA-256 fingerprint (64 hex digits), or give "serial"')
    return sha


def _toggled(table: dict[str, dict[str, Any]], key: str, stamp: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    if stamp is None and key not in table:
        raise IncidentError(f"{key!r} is not in force", 409)
    out = {k: v for k, v in table.items() if k != key}
    if stamp is not None:
        out[key] = stamp
    return out


class IncidentStore:
    """The controls this process enforces, kept in step with the file and Redis (see above)."""

    def __init__(self, path: Path, redis_url: str = "", timeout_s: float = 0.5) -> None:
        self.path = path
        self.controls = Controls()
        self.redis: Any = None
        if redis_url.startswith(("redis://", "rediss://")):
            import redis.asyncio

            self.redis = redis.asyncio.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.timeout_s = timeout_s
        self.degraded: str | None = None
        self._acting = asyncio.Lock()
        self._mtime = -1.0
        self._task: asyncio.Task[None] | None = None
        self.refresh_file()

    # -- the file ---------------------------------------------------------------------------------
    def _read_file(self) -> Controls | None:
        try:
            return Controls.from_dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.error("%s: unreadable (%s); keeping the controls in force", self.path, exc)
            return None

    def _write_file(self, controls: Controls) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(controls.as_dict(), f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def refresh_file(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime != self._mtime:
            self._mtime = mtime
            self._adopt(self._read_file())

    def _adopt(self, controls: Controls | None) -> bool:
        if controls is None or controls.version <= self.controls.version:
            return False
        self.controls = controls
        log.info("incident controls: version %d in force", controls.version)
        return True

    # -- Redis ------------------------------------------------------------------------------------
    async def _shared(self) -> Controls | None:
        """Redis's snapshot when it is newer than ours (one small read when it is not), else None."""
        version = await asyncio.wait_for(self.redis.get(VERSION_KEY), self.timeout_s)
        if version is not None and int(version) <= self.controls.version:
            return None
        raw = await asyncio.wait_for(self.redis.get(KEY), self.timeout_s)
        return Controls.from_dict(json.loads(raw)) if raw else Controls()

    async def _publish(self, controls: Controls) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(KEY, json.dumps(controls.as_dict()))
        pipe.set(VERSION_KEY, controls.version)
        await asyncio.wait_for(pipe.execute(), self.timeout_s)

    def _failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:200]
        if self.degraded is None:
            log.warning("incident-control storage unreachable (%s); the controls in force stay in force", reason)
        self.degraded = reason

    async def refresh(self) -> None:
        """Take a newer snapshot from the file or from Redis (and put ours back where Redis lost it)."""
        self.refresh_file()
        if self.redis is None:
            return
        try:
            shared = await self._shared()
            if shared is None:
                pass  # nothing newer there
            elif shared.version < self.controls.version:  # Redis lost what we hold: put it back
                await self._publish(self.controls)
            elif shared.version > self.controls.version:
                with self._locked():
                    self._keep(shared)
        except Exception as exc:  # never lifts what is in force
            self._failed(exc)
            return
        if self.degraded is not None:
            log.warning("incident-control storage is back")
            self.degraded = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.refresh()
            except Exception:  # pragma: no cover - refresh catches what it expects; keep polling
                log.exception("refreshing the incident controls")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.redis is not None:
            await self.redis.aclose()

    # -- actions ----------------------------------------------------------------------------------
    async def act(self, action: str, params: dict[str, Any], by: str, reason: str) -> Controls:
        """Apply an operator's action everywhere this store reaches; the new snapshot. The file lock
        is never held across an await (the event loop would wait on itself)."""
        async with self._acting:
            if self.redis is None:
                with self._locked():
                    self.refresh_file()
                    new = self.controls.apply(action, params, by, reason)
                    self._keep(new)
            else:
                new = await self._act_shared(action, params, by, reason)
                with self._locked():
                    self._keep(new)
        log.warning("incident control %s by %s (%s): version %d", action, by, reason, new.version)
        return new

    def _keep(self, new: Controls) -> None:
        """``new`` into the file (unless the file holds a newer one) and in force here; under the lock."""
        on_file = self._read_file()
        if on_file is None or on_file.version < new.version:
            self._write_file(new)
            self._mtime = self.path.stat().st_mtime
        self._adopt(new)

    async def _act_shared(self, action: str, params: dict[str, Any], by: str, reason: str) -> Controls:
        from redis.exceptions import WatchError

        try:
            for _ in range(20):
                async with self.redis.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(KEY)
                        raw = await pipe.get(KEY)
                        shared = Controls.from_dict(json.loads(raw)) if raw else Controls()
                        base = shared if shared.version >= self.controls.version else self.controls
                        new = base.apply(action, params, by, reason)
                        pipe.multi()
                        pipe.set(KEY, json.dumps(new.as_dict()))
                        pipe.set(VERSION_KEY, new.version)
                        await asyncio.wait_for(pipe.execute(), self.timeout_s)
                        return new
                    except WatchError:
                        continue
        except IncidentError:
            raise
        except Exception as exc:
            self._failed(exc)
            raise IncidentError(f"the incident-control storage (Redis) is unreachable ({self.degraded}); the "
                                "action was not applied, since the other replicas would not enforce it; retry",
                                503) from None
        raise IncidentError("the controls kept changing under this action; retry", 503)
