"""From a model's folder to the bytes a worker may load: verify the signature, unseal, check the
digest, admit."""

from __future__ import annotations

from pathlib import Path

from gateway.config import SupplyConfig
from gateway.registry.admission import AdmissionError, admit
from gateway.registry.manifest import Manifest, ManifestError
from gateway.registry.sealing import SEALED_NAME, SealError, key_provider, unseal
from gateway.registry.signing import SignatureError, verify_model

__all__ = ["load_model_bytes"]


def load_model_bytes(manifest: Manifest, supply: SupplyConfig, kek_file: str = "", remote: bool = False) -> bytes:
    """The verified, admitted model bytes, in memory; ``ManifestError`` with the reason otherwise.
    ``kek_file``: the model's own key-encryption key, instead of ``supply``'s. ``remote``: the model
    runs on worker hosts only: its signature is checked here, its bytes are neither unsealed nor
    returned (b"")."""
    sealed = manifest.path / SEALED_NAME
    where = f"{manifest.name}/{manifest.version}"
    try:
        if supply.require_signature:
            verify_model(manifest.path, [Path(k) for k in supply.trusted_keys])
        if remote:
            return b""
        if sealed.exists():
            plaintext = unseal(sealed.read_bytes(), manifest.name, manifest.version,
                               key_provider(supply, kek_file or None))
            data = manifest.read_verified(plaintext)
        else:
            data = manifest.read_verified()
        admit(data, supply, None, manifest)  # every model reaches its worker as bytes: no external data
    except SignatureError as exc:
        raise ManifestError(f"{where}: refused: {exc}") from None
    except SealError as exc:
        raise ManifestError(f"{where}: cannot unseal: {exc}") from None
    except AdmissionError as exc:
        raise ManifestError(f"{where}: refused at admission: {exc}") from None
    except FileNotFoundError:
        raise ManifestError(f"{where}: neither model.onnx nor {SEALED_NAME} exists") from None
    return data
