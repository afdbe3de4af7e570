"""The built-in issuer's store: signing keys, clients and people on disk; secrets and one-time codes.

A private directory: ``keys.json`` (signing keys; the newest signs, retired ones stay published
until every token they signed has expired), ``clients.json`` and ``users.json`` (secrets only as
scrypt hashes; TOTP seeds, which a verifier must be able to read). The ``gateway`` commands edit
it; serving processes pick changes up within a second.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from joserfc.jwk import ECKey, KeySet

__all__ = ["TOTP_STEP", "IssuerStore", "enrolment_uri", "hash_secret", "new_totp_secret", "totp", "totp_now",
           "unknown_account_hash", "verify_secret"]

TOTP_STEP = 30

# scrypt (RFC 7914) at 16 MiB, about 50 ms: a secret costs an attacker that much per guess.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_secret(secret: str) -> str:
    salt = os.urandom(16)
    digest = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P).derive(secret.encode())
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        Scrypt(salt=base64.b64decode(salt), length=32, n=int(n), r=int(r), p=int(p)).verify(
            secret.encode(), base64.b64decode(digest))
        return True
    except (ValueError, InvalidKey):
        return False


@functools.cache
def unknown_account_hash() -> str:
    """Checked against for accounts that do not exist, so they cost the same time as those that do
    (made on first use: scrypt is not start-up work)."""
    return hash_secret(secrets.token_urlsafe(16))


def totp(secret_b32: str) -> TOTP:
    return TOTP(base64.b32decode(secret_b32), 6, hashes.SHA1(), TOTP_STEP, enforce_key_length=True)


def new_totp_secret() -> str:
    return base64.b32encode(os.urandom(20)).decode()


def totp_now(secret_b32: str, at: float | None = None) -> str:
    """The current one-time code (what an authenticator app would show)."""
    return totp(secret_b32).generate(int(time.time() if at is None else at)).decode()


def _write_private(path: Path, data: Any) -> None:
    """Atomically replace a 0600 JSON file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class IssuerStore:
    """Signing keys, clients and users on disk, re-read when a file changes."""

    def __init__(self, directory: str | os.PathLike[str], recheck_s: float = 1.0) -> None:
        self.directory = Path(directory)
        self.recheck_s = recheck_s
        """How long a read is trusted before the file's mtime is checked again."""
        self._cache: dict[str, tuple[float, Any]] = {}
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()
        self._public: tuple[Any, KeySet] | None = None

    def _read(self, name: str, default: Any) -> Any:
        path = self.directory / name
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and now - self._checked.get(name, 0) < self.recheck_s:
                return cached[1]
            self._checked[name] = now
            try:
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:
                return default
            if cached is None or cached[0] != mtime:
                cached = (mtime, json.loads(path.read_text()))
                self._cache[name] = cached
            return cached[1]

    def _write(self, name: str, data: Any) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(self.directory / name, data)
        with self._lock:
            self._cache.pop(name, None)

    # -- signing keys ---------------------------------------------------------------------------
    def signing_keys(self) -> list[dict[str, Any]]:
        return list(self._read("keys.json", {"keys": []})["keys"])

    def rotate(self, keep_retired_s: float) -> str:
        """A new current key; the previous ones stay published for ``keep_retired_s``."""
        now = time.time()
        keys = []
        for k in self.signing_keys():
            retired = k.get("retired_at") or now
            if now - retired <= keep_retired_s:
                keys.append({**k, "retired_at": retired})
        key = ECKey.generate_key("P-256", {"alg": "ES256", "use": "sig"}, private=True)
        key.ensure_kid()
        keys.append({"jwk": key.as_dict(private=True), "created_at": now, "retired_at": None})
        self._write("keys.json", {"keys": keys})
        return str(key.kid)

    def current_key(self) -> KeySet:
        current = [k for k in self.signing_keys() if not k.get("retired_at")]
        if not current:
            raise RuntimeError(f"no signing key in {self.directory} (run `gateway keys rotate`)")
        return KeySet.import_key_set({"keys": [current[-1]["jwk"]]})

    def public_keys(self) -> KeySet:
        """The public halves, imported once per change of ``keys.json`` (this runs on every request)."""
        raw = self._read("keys.json", {"keys": []})
        cached = self._public
        if cached is None or cached[0] is not raw:
            public = [{k: v for k, v in entry["jwk"].items() if k != "d"} for entry in raw["keys"]]
            cached = (raw, KeySet.import_key_set({"keys": public}))
            self._public = cached
        return cached[1]

    def jwks(self) -> dict[str, Any]:
        return dict(self.public_keys().as_dict(private=False))

    # -- clients and users ----------------------------------------------------------------------
    def clients(self) -> dict[str, Any]:
        return dict(self._read("clients.json", {}))

    def users(self) -> dict[str, Any]:
        return dict(self._read("users.json", {}))

    def add_client(self, client_id: str, roles: list[str], description: str = "") -> str:
        """Register a client_credentials client; returns its secret, which is stored only hashed."""
        secret = secrets.token_urlsafe(32)
        clients = self.clients()
        clients[client_id] = {"secret_hash": hash_secret(secret), "roles": sorted(roles),
                              "grants": ["client_credentials"], "description": description,
                              "created_at": int(time.time())}
        self._write("clients.json", clients)
        return secret

    def add_user(self, username: str, password: str, roles: list[str]) -> str:
        """Register a person with a password and TOTP; returns the TOTP secret (base32)."""
        totp_secret = new_totp_secret()
        users = self.users()
        users[username] = {"password_hash": hash_secret(password), "totp_secret": totp_secret,
                           "roles": sorted(roles), "created_at": int(time.time())}
        self._write("users.json", users)
        return totp_secret

    def remove(self, kind: str, name: str) -> bool:
        table = self.clients() if kind == "client" else self.users()
        if name not in table:
            return False
        del table[name]
        self._write("clients.json" if kind == "client" else "users.json", table)
        return True


def enrolment_uri(totp_secret: str, username: str, issuer_name: str) -> str:
    return totp(totp_secret).get_provisioning_uri(username, issuer_name)
