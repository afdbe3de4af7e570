"""Model signatures in the OpenSSF model-signing format (``model-signing``, key-based, offline).

A model version folder is signed as a whole: every file in it (the ONNX file or its sealed form,
the manifest, any external data) is hashed into a signed in-toto statement, stored beside them
as ``model.sig`` (a Sigstore bundle). Verification fails on a changed byte, a missing or an
extra file, and a signature by a key that is not one of ``supply.trusted_keys``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["SIGNATURE_NAME", "SignatureError", "sign_model", "verify_model"]

SIGNATURE_NAME = "model.sig"
MAX_SIGNATURE_BYTES = 1024 * 1024


class SignatureError(ValueError):
    """A model whose signature is missing, broken, or by an untrusted key."""


def _hashing(folder: Path) -> Any:
    from model_signing import hashing

    config: Any = hashing.Config()  # type: ignore[no-untyped-call]
    return config.set_ignored_paths(paths=[folder / SIGNATURE_NAME], ignore_git_paths=True)


def sign_model(folder: Path, private_key: Path) -> Path:
    """Sign ``folder`` with an EC private key (PEM); returns the signature's path."""
    from model_signing import signing

    folder = folder.resolve()  # the library ignores model.sig only by its absolute path
    signature = folder / SIGNATURE_NAME
    config: Any = signing.Config()  # type: ignore[no-untyped-call]
    config.use_elliptic_key_signer(private_key=private_key).set_hashing_config(_hashing(folder)).sign(folder, signature)
    return signature


def verify_model(folder: Path, trusted_keys: list[Path]) -> Path:
    """The trusted key that signed ``folder``; ``SignatureError`` with the reason otherwise."""
    from model_signing import verifying

    folder = folder.resolve()
    signature = folder / SIGNATURE_NAME
    if not signature.exists():
        raise SignatureError(f"unsigned: {signature} does not exist (sign it with `gateway models sign`)")
    if not trusted_keys:
        raise SignatureError("no trusted keys are configured (supply.trusted_keys)")
    size = signature.stat().st_size
    if size > MAX_SIGNATURE_BYTES:  # a bundle is a few KiB; a planted one of gigabytes is not parsed
        raise SignatureError(f"{signature} is {size} bytes; a signature bundle is at most {MAX_SIGNATURE_BYTES}")
    reasons = []
    for key in trusted_keys:
        try:
            config: Any = verifying.Config()  # type: ignore[no-untyped-call]
            config.use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing(folder)).verify(folder, signature)
            return key
        except ValueError as exc:
            reasons.append(str(exc))
    mismatch = [r for r in reasons if not r.startswith("Key mismatch")]
    if mismatch:
        raise SignatureError(f"the signature does not match the files: {mismatch[0][:300]}")
    raise SignatureError("signed by a key that is not trusted (supply.trusted_keys)")
