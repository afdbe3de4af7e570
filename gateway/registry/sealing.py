"""Encryption at rest for model files: AES-256-GCM under a per-model data key, wrapped by a KEK.

``model.onnx.sealed`` is ``MAGIC``, a 4-byte header length, a JSON header and the ciphertext
(with its GCM tag). The header holds the model's name and version (also the GCM associated
data, so a sealed file cannot be passed off as another model), the nonce, and the data key
wrapped with AES key wrap (RFC 3394) under the key-encryption key, named by ``kek_id``.
Rotating the KEK (``rewrap``) rewrites only the header: the model is not re-encrypted.

The KEK comes from a ``KeyProvider``: a file or an environment variable here; a cloud KMS or
Vault is another class with ``kek_id``, ``wrap`` and ``unwrap``, named by ``supply.kek_provider``.
The gateway process unseals into memory and hands the plaintext to the worker on its standard
input: the plaintext never touches a disk, and workers never hold a key.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import struct
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from gateway.config import SupplyConfig

__all__ = ["SEALED_NAME", "KeyProvider", "LocalKey", "SealError", "key_provider", "rewrap", "seal", "unseal"]

MAGIC = b"GWSEAL1\n"
SEALED_NAME = "model.onnx.sealed"


class SealError(ValueError):
    """A sealed model that cannot be opened (wrong key, altered file), or no key to open it."""


class KeyProvider(Protocol):
    def kek_id(self) -> str: ...

    def wrap(self, data_key: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes) -> bytes: ...


class LocalKey:
    """A 256-bit KEK held by this process (from a file or the environment)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SealError(f"the key-encryption key must be 32 bytes, not {len(key)}")
        self._key = key

    @classmethod
    def parse(cls, text: bytes) -> LocalKey:
        raw = text.strip()
        if len(raw) != 32:
            try:
                raw = base64.b64decode(raw, validate=True)
            except ValueError:
                raise SealError("the key-encryption key is neither 32 raw bytes nor base64 of them") from None
        return cls(raw)

    def kek_id(self) -> str:
        return hashlib.sha256(b"gateway-kek" + self._key).hexdigest()[:16]

    def wrap(self, data_key: bytes) -> bytes:
        return aes_key_wrap(self._key, data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return aes_key_unwrap(self._key, wrapped)
        except InvalidUnwrap:
            raise SealError("the data key does not unwrap with this key-encryption key") from None


def key_provider(config: SupplyConfig, kek_file: str | None = None) -> KeyProvider:
    """The configured KEK: ``supply.kek_provider`` (module:Class), else the file, else the variable."""
    if config.kek_provider:
        module, _, name = config.kek_provider.partition(":")
        factory = getattr(importlib.import_module(module), name)
        provider: KeyProvider = factory(config)
        return provider
    path = kek_file if kek_file is not None else config.kek_file
    if path:
        try:
            return LocalKey.parse(Path(path).read_bytes())
        except OSError as exc:
            raise SealError(f"cannot read the key-encryption key {path}: {exc.strerror}") from None
    value = os.environ.get(config.kek_env)
    if value:
        return LocalKey.parse(value.encode())
    raise SealError(f"no key-encryption key: set supply.kek_file, or {config.kek_env}")


def _aad(name: str, version: str) -> bytes:
    return f"gateway-model:{name}/{version}".encode()


def _split(data: bytes) -> tuple[dict[str, str], bytes]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise SealError("not a sealed model file")
    (length,) = struct.unpack_from(">I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + length])
    except ValueError:
        raise SealError("the sealed file's header is corrupt") from None
    return header, data[start + length:]


def _join(header: dict[str, str], ciphertext: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + ciphertext


def seal(plaintext: bytes, name: str, version: str, provider: KeyProvider) -> bytes:
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    header = {"alg": "AES-256-GCM", "wrap": "AES-KW", "name": name, "version": version,
              "kek_id": provider.kek_id(), "nonce": base64.b64encode(nonce).decode(),
              "wrapped_key": base64.b64encode(provider.wrap(data_key)).decode()}
    return _join(header, AESGCM(data_key).encrypt(nonce, plaintext, _aad(name, version)))


def unseal(data: bytes, name: str, version: str, provider: KeyProvider) -> bytes:
    header, ciphertext = _split(data)
    if header.get("name") != name or header.get("version") != version:
        raise SealError(f"the sealed file is for {header.get('name')}/{header.get('version')}, not {name}/{version}")
    if header.get("kek_id") != provider.kek_id():
        raise SealError(f"the model is sealed under key {header.get('kek_id')}, not {provider.kek_id()}")
    data_key = provider.unwrap(base64.b64decode(header["wrapped_key"]))
    try:
        return AESGCM(data_key).decrypt(base64.b64decode(header["nonce"]), ciphertext, _aad(name, version))
    except Exception:  # cryptography's InvalidTag: the ciphertext or its header was altered
        raise SealError("the sealed model does not authenticate (altered, or sealed for another model)") from None


def rewrap(data: bytes, old: KeyProvider, new: KeyProvider) -> bytes:
    """The same ciphertext with its data key wrapped under ``new`` instead of ``old``."""
    header, ciphertext = _split(data)
    if header.get("kek_id") != old.kek_id():
        raise SealError(f"the model is sealed under key {header.get('kek_id')}, not {old.kek_id()}")
    data_key = old.unwrap(base64.b64decode(header["wrapped_key"]))
    header = {**header, "kek_id": new.kek_id(), "wrapped_key": base64.b64encode(new.wrap(data_key)).decode()}
    return _join(header, ciphertext)
