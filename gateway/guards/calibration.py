"""A model version's calibration: ``calibration.json`` in its folder, signed with its other files.

``gateway models calibrate FOLDER --data clean.npy`` runs the model (ONNX Runtime, CPU, in this
process) on held-out clean inputs and on their squeezed copies, and writes every detector's score
per calibration row, the anomaly statistics (mean and precision of the features), the per-detector
and combined thresholds at the target false-positive rate, and the digests of the data and of the
model it was made for. The gateway recomputes the thresholds for the detectors a model enables and
its configured target rate from the stored scores, and refuses a calibration made for another
model (another digest or input shape) at load, naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.config import SupplyConfig
from gateway.cpus import available_cpus
from gateway.guards.detectors import (
    DETECTORS,
    Reference,
    Squeezer,
    combined_scores,
    confidence_scores,
    features,
    fit_gaussian,
    mahalanobis,
    parse_squeezer,
    probabilities,
    squeeze_scores,
)
from gateway.registry.manifest import Manifest, ManifestError, TensorSpec
from gateway_client.protocol.datatypes import FLOATS, numpy_dtype

__all__ = ["CALIBRATION_NAME", "Calibration", "CalibrationError", "calibrate", "calibrate_folder", "image_shape",
           "load_calibration"]

CALIBRATION_NAME = "calibration.json"
FORMAT = "gateway-calibration/1"
MIN_ROWS = 50
"""Fewer clean rows cannot place a threshold at a few percent."""
MAX_CALIBRATION_BYTES = 64 * 1024 * 1024
"""Thresholds and a score per held-out row and detector: a few MB for a hundred thousand rows."""
CHUNK_ROWS = 64


class CalibrationError(ManifestError):
    """A calibration that cannot be made or used, with the file and the reason."""


def image_shape(manifest: Manifest, declared: Sequence[int] = ()) -> tuple[int, int, int] | None:
    """The (channels, height, width) an input row is viewed as for median squeezing and pooling:
    the declared ``image`` setting, else the row shape itself when it has two or three axes."""
    row = tuple(manifest.inputs[0].shape[1:])
    if declared:
        dims = tuple(declared)
        shape = dims if len(dims) == 3 else (1, *dims)
    elif len(row) == 3:
        shape = row
    elif len(row) == 2:
        shape = (1, *row)
    else:
        return None
    if len(shape) != 3 or int(np.prod(shape)) != int(np.prod(row)) or min(shape) < 1:
        raise CalibrationError(f"{manifest.name}: image {list(declared)} does not hold an input row of shape {list(row)}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


@dataclass(frozen=True)
class Calibration:
    """What the guard needs of a calibration file, checked against its model."""

    path: Path
    squeezers: tuple[Squeezer, ...]
    image: tuple[int, int, int] | None
    outputs: str
    """How the first output reads: ``probabilities`` or ``logits``."""
    mean: np.ndarray
    precision: np.ndarray
    scores: dict[str, np.ndarray]
    """Every detector's score on every calibration row, in row order."""
    domain: tuple[float, float]
    data_sha256: str

    def references(self, detectors: Sequence[str]) -> dict[str, Reference]:
        return {name: Reference(self.scores[name]) for name in detectors}

    def combined(self, detectors: Sequence[str]) -> np.ndarray:
        """The calibration rows' combined scores, sorted."""
        references = self.references(detectors)
        return np.sort(combined_scores({n: self.scores[n] for n in detectors}, references))

    def threshold(self, detectors: Sequence[str], target_fpr: float) -> float:
        """The combined score above which a calibration row counts as a detection, at ``target_fpr``."""
        return float(np.quantile(self.combined(detectors), 1.0 - target_fpr, method="higher"))


def _domain(manifest: Manifest) -> tuple[float, float]:
    spec = manifest.inputs[0]
    if spec.min is None or spec.max is None:
        raise CalibrationError(f"{manifest.name}/{manifest.version}: the input {spec.name!r} declares no domain "
                               "(min and max), which squeezing quantizes over")
    return float(spec.min), float(spec.max)


def _check_model(manifest: Manifest) -> str:
    """The name of the scores output to judge, when the guard can judge ``manifest``'s model."""
    where = f"{manifest.name}/{manifest.version}"
    if len(manifest.inputs) != 1 or manifest.inputs[0].datatype not in FLOATS:
        takes = ", ".join(f"{i.name} {i.datatype}" for i in manifest.inputs)
        raise CalibrationError(f"{where}: the guard needs one floating-point input; this model takes {takes}")
    if manifest.inputs[0].shape[:1] != (-1,) or -1 in manifest.inputs[0].shape[1:]:
        raise CalibrationError(f"{where}: the guard needs an input of shape [-1, fixed dimensions...]")
    if manifest.scores is None:
        answers = ", ".join(o.described for o in manifest.outputs)
        raise CalibrationError(f"{where}: the guard judges a floating-point scores output of shape [-1, classes] "
                               f"(probabilities or logits); this model answers {answers}")
    return manifest.scores.name


def _run_all(session: Any, spec: TensorSpec, x: np.ndarray, scores: str) -> np.ndarray:
    """The model's ``scores`` output on ``x``, sent in the datatype it declares (FP16, FP32 or FP64),
    as the gateway sends requests and the guard's squeezed copies."""
    dtype = numpy_dtype(spec.datatype)
    parts = [session.run([scores], {spec.name: x[i:i + CHUNK_ROWS].astype(dtype, copy=False)})[0]
             for i in range(0, len(x), CHUNK_ROWS)]
    return np.concatenate(parts)


def _held_out_distances(f: np.ndarray, folds: int = 5) -> np.ndarray:
    """Each row's Mahalanobis distance under statistics fitted without it (five folds): distances
    of the rows the fit saw are smaller than those of new inputs, and a threshold placed on them
    would flag more clean traffic than the target rate."""
    order = np.random.default_rng(0).permutation(len(f))
    out = np.empty(len(f))
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        mean, precision = fit_gaussian(f[rest])
        out[part] = mahalanobis(f[part], mean, precision)
    return out


def calibrate(manifest: Manifest, model: bytes, data: np.ndarray, data_sha256: str, squeezers: Sequence[str],
              image: Sequence[int], target_fpr: float, progress: Any = None) -> dict[str, Any]:
    """The calibration document for ``manifest``'s model (its verified ``model`` bytes) on ``data``."""
    import onnxruntime as ort

    scores_output = _check_model(manifest)
    where = f"{manifest.name}/{manifest.version}"
    spec = manifest.inputs[0]
    row = spec.shape[1:]
    if data.ndim != len(spec.shape) or tuple(data.shape[1:]) != row:
        raise CalibrationError(f"{where}: the data has shape {list(data.shape)}, the model takes [-1, {', '.join(map(str, row))}]")
    if len(data) < MIN_ROWS:
        raise CalibrationError(f"{where}: {len(data)} rows; calibration needs at least {MIN_ROWS} held-out clean rows")
    if not np.isfinite(data).all():
        raise CalibrationError(f"{where}: the data holds NaN or infinite values")
    lo, hi = _domain(manifest)
    if data.min() < lo or data.max() > hi:
        raise CalibrationError(f"{where}: the data leaves the declared domain [{lo}, {hi}]")
    x = data.astype(np.float32)
    parsed = [parse_squeezer(s) for s in squeezers]
    shape = image_shape(manifest, image)
    if any(s.kind == "median" for s in parsed) and shape is None:
        raise CalibrationError(f"{where}: median squeezers need an image shape (set image = [height, width])")
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(4, available_cpus())
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    say = progress or (lambda text: None)
    started = time.monotonic()
    say(f"running the model on {len(x)} rows and {len(parsed)} squeezed copies of each")
    raw = _run_all(session, spec, x, scores_output)
    kind = "probabilities" if (raw.min() >= 0 and np.allclose(raw.reshape(len(raw), -1).sum(axis=1), 1.0, atol=1e-3)) else "logits"
    p = probabilities(raw, kind)
    squeezed = [probabilities(_run_all(session, spec, s.apply(x, lo, hi, shape), scores_output), kind) for s in parsed]
    f = features(x, shape)
    mean, precision = fit_gaussian(f)
    scores = {
        "squeeze": squeeze_scores(p, squeezed),
        "anomaly": _held_out_distances(f),
        "confidence": confidence_scores(p),
    }
    doc: dict[str, Any] = {
        "format": FORMAT,
        "model": {"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256},
        "input": {"name": spec.name, "shape": list(row)},
        "data": {"sha256": data_sha256, "rows": len(x)},
        "squeezers": [s.spec for s in parsed],
        "image": list(shape) if shape else None,
        "domain": [lo, hi],
        "outputs": kind,
        "anomaly": {"features": int(f.shape[1]), "mean": mean.tolist(), "precision": precision.tolist()},
        "scores": {name: [float(v) for v in s] for name, s in scores.items()},
        "target_fpr": target_fpr,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    cal = _from_doc(doc, manifest.path / CALIBRATION_NAME)
    doc["thresholds"] = {name: float(np.quantile(cal.scores[name], 1.0 - target_fpr, method="higher"))
                         for name in DETECTORS}
    doc["thresholds"]["combined"] = cal.threshold(DETECTORS, target_fpr)
    say(f"done in {time.monotonic() - started:.1f} s")
    return doc


def calibrate_folder(folder: Path, supply: SupplyConfig, data_file: Path, squeezers: Sequence[str],
                     image: Sequence[int], target_fpr: float, progress: Any = None) -> tuple[Path, dict[str, Any]]:
    """Calibrate the model version in ``folder`` (sealed or not; its signature is made again
    afterwards, so it is not checked here) on ``data_file`` and write the file; its path and content."""
    from gateway.registry.loading import load_model_bytes
    from gateway.registry.manifest import load_manifest

    manifest = load_manifest(folder)
    model = load_model_bytes(manifest, dataclasses.replace(supply, require_signature=False))
    data, digest = data_digest(data_file)
    doc = calibrate(manifest, model, data, digest, squeezers, image, target_fpr, progress)
    return write_calibration(folder, doc), doc


def write_calibration(folder: Path, doc: dict[str, Any]) -> Path:
    path = folder / CALIBRATION_NAME
    tmp = folder / (CALIBRATION_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def data_digest(path: Path) -> tuple[np.ndarray, str]:
    raw = path.read_bytes()
    array = np.load(io.BytesIO(raw), allow_pickle=False)
    if not isinstance(array, np.ndarray):
        raise CalibrationError(f"{path}: expected one array (.npy)")
    return array, hashlib.sha256(raw).hexdigest()


def _from_doc(doc: dict[str, Any], path: Path) -> Calibration:
    scores = {name: np.asarray(doc["scores"][name], dtype=np.float64) for name in DETECTORS}
    lengths = {len(s) for s in scores.values()}
    if len(lengths) != 1 or lengths.pop() < MIN_ROWS:
        raise CalibrationError(f"{path}: the detectors' scores are missing or of unequal length")
    image = doc.get("image")
    mean = np.asarray(doc["anomaly"]["mean"], dtype=np.float64)
    precision = np.asarray(doc["anomaly"]["precision"], dtype=np.float64)
    if precision.shape != (len(mean), len(mean)):
        raise CalibrationError(f"{path}: the anomaly statistics are malformed")
    lo, hi = doc["domain"]
    return Calibration(
        path=path,
        squeezers=tuple(parse_squeezer(s) for s in doc["squeezers"]),
        image=(int(image[0]), int(image[1]), int(image[2])) if image else None,
        outputs=str(doc["outputs"]),
        mean=mean,
        precision=precision,
        scores=scores,
        domain=(float(lo), float(hi)),
        data_sha256=str(doc["data"]["sha256"]),
    )


def load_calibration(manifest: Manifest) -> Calibration:
    """``manifest``'s version folder's calibration, checked against the model; ``CalibrationError``
    naming the file otherwise. (The folder's signature, which covers the file, is checked by the
    caller with the model's.)"""
    _check_model(manifest)  # before the file: no calibration could be made for another kind of model
    path = manifest.path / CALIBRATION_NAME
    try:
        with open(path, "rb") as f:  # the serving process reads it again when it follows a swap
            raw = f.read(MAX_CALIBRATION_BYTES + 1)
        if len(raw) > MAX_CALIBRATION_BYTES:
            raise CalibrationError(f"{path}: over {MAX_CALIBRATION_BYTES} bytes; no calibration is that large")
        doc = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{path}: missing; run `gateway models calibrate {manifest.path} --data CLEAN.npy`, "
                               "then sign the folder again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: not valid JSON: {exc}") from None
    try:
        if doc.get("format") != FORMAT:
            raise CalibrationError(f"{path}: format {doc.get('format')!r} is not {FORMAT}")
        made_for = doc["model"]
        if made_for.get("sha256") != manifest.sha256:
            raise CalibrationError(f"{path}: made for the model with SHA-256 {made_for.get('sha256')}, but "
                                   f"{manifest.name}/{manifest.version} is {manifest.sha256}: calibrate it again")
        row = list(manifest.inputs[0].shape[1:])
        if doc["input"].get("shape") != row or doc["input"].get("name") != manifest.inputs[0].name:
            raise CalibrationError(f"{path}: made for input {doc['input']}, the model takes "
                                   f"{manifest.inputs[0].name!r} of row shape {row}")
        return _from_doc(doc, path)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, CalibrationError):
            raise
        raise CalibrationError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None
