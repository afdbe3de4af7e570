"""Model repository: manifests, signatures, and (later) signing, encryption and admission."""

from gateway.registry.manifest import Manifest, ManifestError, TensorSpec, load_manifest
from gateway.registry.signature import check_inputs, check_outputs

__all__ = ["Manifest", "ManifestError", "TensorSpec", "check_inputs", "check_outputs", "load_manifest"]
