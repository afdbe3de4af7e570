"""Model manifests: ``<root>/<name>/<version>/manifest.json`` beside the ONNX file.

A manifest declares the model's signature (inputs and outputs with datatype, shape, with ``-1``
for a variable dimension, and an optional value domain), whether the first dimension of every
input and output is the batch (``"batch": true``: the model answers one row per input row), the
ONNX file's SHA-256 and the preferred device. The gateway checks requests against it before any
worker sees a byte, and a worker's answers after.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway_client.protocol.datatypes import DATATYPES, FLOATS

__all__ = ["NAME_PATTERN", "Manifest", "ManifestError", "TensorSpec", "load_manifest", "load_manifests"]

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.units import Unit

# Model names and versions: a strict charset, no path separators, no leading dot. Always used with
# ``fullmatch``: ``$`` would accept a trailing newline ("digits\n").
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


MAX_MANIFEST_BYTES = 1024 * 1024


class ManifestError(ValueError):
    """A manifest or model file that cannot be served, with the reason."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    min: float | None = None
    max: float | None = None
    clip: bool = False
    """Out-of-domain values are clipped into it (domain ``"policy": "clip"``) instead of refused."""
    text: bool = True
    """BYTES elements must be UTF-8 (``"encoding": "binary"`` lifts it)."""

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @property
    def described(self) -> str:
        """``name DATATYPE [shape]``, as refusals name a tensor."""
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str
    device: str = "auto"
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    batch: bool = False
    """The first dimension of every input and output is the batch: a worker answers exactly one row
    per input row, so its answer to a request is bounded by the request (``answer_bound``)."""

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def scores(self) -> TensorSpec | None:
        """The output the guard, the extraction monitor and explanations judge: the first
        floating-point one declared ``[-1, classes]`` (a classifier's probabilities or logits; not
        its label, which converted scikit-learn classifiers answer first)."""
        return next((s for s in self.outputs
                     if s.datatype in FLOATS and len(s.shape) == 2 and s.shape[0] == -1), None)

    def read_verified(self, plaintext: bytes | None = None) -> bytes:
        """The ONNX file's bytes (or ``plaintext`` unsealed elsewhere), refused unless they match
        the manifest's SHA-256."""
        data = self.onnx_path.read_bytes() if plaintext is None else plaintext
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise ManifestError(
                f"{self.name}/{self.version}: model.onnx has SHA-256 {digest}, "
                f"the manifest says {self.sha256}"
            )
        return data


def _spec(raw: Any, where: str) -> TensorSpec:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} must be an object")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}.name must be a non-empty string")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ManifestError(f"{where}.datatype {datatype!r} is not a known datatype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= -1 for d in shape):
        raise ManifestError(f"{where}.shape must be a list of integers >= -1")
    domain = raw.get("domain") or {}
    lo, hi = domain.get("min"), domain.get("max")
    if lo is not None and hi is not None and lo > hi:
        raise ManifestError(f"{where}.domain has min > max")
    policy = domain.get("policy", "reject")
    if policy not in ("reject", "clip"):
        raise ManifestError(f"{where}.domain.policy must be 'reject' or 'clip'")
    encoding = raw.get("encoding", "utf-8")
    if encoding not in ("utf-8", "binary"):
        raise ManifestError(f"{where}.encoding must be 'utf-8' or 'binary'")
    return TensorSpec(name, datatype, tuple(shape), lo, hi, policy == "clip", encoding == "utf-8")


def load_manifest(directory: Path) -> Manifest:
    """Read and validate ``directory/manifest.json``; raises ``ManifestError`` with the reason. It is
    read before the folder's signature is checked (it names what to check), so at most
    ``MAX_MANIFEST_BYTES`` of it are read: a planted file of gigabytes is refused, not parsed."""
    try:
        with open(directory / "manifest.json", "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{directory}/manifest.json is over {MAX_MANIFEST_BYTES} bytes; a manifest "
                                "describes a model, it does not hold one")
        raw = json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{directory}: no manifest.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{directory}/manifest.json is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{directory}/manifest.json must hold an object")
    name, version = str(raw.get("name", "")), str(raw.get("version", ""))
    for what, value in (("name", name), ("version", version)):
        if not NAME_PATTERN.fullmatch(value) or ".." in value:
            raise ManifestError(f"{directory}: manifest {what} {value!r} is not a valid identifier")
    onnx = raw.get("onnx") or {}
    sha = onnx.get("sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ManifestError(f"{directory}: manifest onnx.sha256 must be 64 hex digits")
    if onnx.get("file", "model.onnx") != "model.onnx":
        raise ManifestError(f"{directory}: the model file must be named model.onnx")
    inputs = tuple(_spec(x, f"inputs[{i}]") for i, x in enumerate(raw.get("inputs") or []))
    outputs = tuple(_spec(x, f"outputs[{i}]") for i, x in enumerate(raw.get("outputs") or []))
    if not inputs or not outputs:
        raise ManifestError(f"{directory}: a manifest needs at least one input and one output")
    device = raw.get("device", "auto")
    if device not in ("auto", "cuda", "cpu"):
        raise ManifestError(f"{directory}: device must be auto, cuda or cpu")
    batch = raw.get("batch", False)
    if not isinstance(batch, bool):
        raise ManifestError(f"{directory}: batch must be true or false")
    fixed = next((s for s in (*inputs, *outputs) if not s.shape or s.shape[0] != -1), None) if batch else None
    if fixed is not None:
        raise ManifestError(f"{directory}: batch is true, so every input and output's first dimension must be -1 "
                            f"(the batch); {fixed.described} has none")
    return Manifest(
        name=name,
        version=version,
        path=directory,
        inputs=inputs,
        outputs=outputs,
        sha256=sha,
        device=device,
        description=str(raw.get("description", "")),
        metrics=dict(raw.get("metrics") or {}),
        batch=batch,
    )


def load_manifests(root: Path, versions: dict[str, str]) -> dict[str, Manifest]:
    """The manifest of each model's chosen version in the repository at ``root``."""
    return {name: load_manifest(root / name / version) for name, version in versions.items()}


def load_units(config: Config) -> dict[Unit, Manifest]:
    """The manifest of every served unit (``config.units()``)."""
    root = Path(config.models_root)
    return {unit: load_manifest(root / unit.model / m.version) for unit, m in config.units()}
