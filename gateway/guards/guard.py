"""A model version's guard: its enabled detectors, calibration and threshold, and the verdict on
a request's rows (the stages that use it are in ``gateway.guards.stages``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from gateway.config import GuardConfig
from gateway.guards.calibration import Calibration, CalibrationError, image_shape, load_calibration
from gateway.guards.detectors import (
    confidence_scores,
    features,
    mahalanobis,
    places,
    probabilities,
    squeeze_scores,
)
from gateway.registry.manifest import Manifest

__all__ = ["TECHNIQUES", "ModelGuard", "Verdict", "check_guard"]

TECHNIQUES = {"squeeze": "AML.T0043", "confidence": "AML.T0043", "anomaly": "AML.T0015"}
"""MITRE ATLAS: crafted adversarial data for the prediction-based detectors, evasion for
out-of-distribution inputs."""


@dataclass(frozen=True)
class Verdict:
    scores: dict[str, float]
    """Each detector's score, the largest over the request's rows."""
    combined: float
    threshold: float
    detector: str
    """The detector whose calibrated place was the highest."""

    @property
    def fired(self) -> bool:
        return self.combined > self.threshold


class ModelGuard:
    """One model version's detectors, calibration and thresholds."""

    def __init__(self, manifest: Manifest, config: GuardConfig, calibration: Calibration) -> None:
        where = f"{calibration.path}"
        squeezers = tuple(s.spec for s in calibration.squeezers)
        if "squeeze" in config.detectors and squeezers != tuple(config.squeezers):
            raise CalibrationError(f"{where}: calibrated with squeezers {list(squeezers)}, the configuration asks for "
                                   f"{list(config.squeezers)}; calibrate again")
        shape = image_shape(manifest, config.image)
        if shape != calibration.image:
            raise CalibrationError(f"{where}: calibrated for image {calibration.image}, the configuration gives {shape}")
        probe = features(np.zeros((1, *manifest.inputs[0].shape[1:]), dtype=np.float32), shape)
        if probe.shape[1] != len(calibration.mean):
            raise CalibrationError(f"{where}: its anomaly statistics do not fit the model's input")
        self.manifest = manifest
        self.config = config
        self.calibration = calibration
        self.detectors = tuple(config.detectors)
        self.squeezers = calibration.squeezers if "squeeze" in self.detectors else ()
        self.references = calibration.references(self.detectors)
        self.clean = calibration.combined(self.detectors)
        self.lo, self.hi = calibration.domain
        self.threshold = self.threshold_for(1)

    @functools.lru_cache(maxsize=1024)  # noqa: B019 (one guard per model version, kept for its life)
    def threshold_for(self, rows: int) -> float:
        """The threshold a request of ``rows`` rows is held to: the target rate is per request, so
        each row is held to ``target_fpr / rows`` (Bonferroni). Past what the calibration data can
        resolve, the threshold is its largest clean score."""
        return float(np.quantile(self.clean, max(0.0, 1.0 - self.config.target_fpr / max(1, rows)), method="higher"))

    def riders(self, x: np.ndarray) -> np.ndarray | None:
        """The squeezed copies of every row, stacked (squeezer by squeezer), or None."""
        if not self.squeezers:
            return None
        return np.asarray(np.concatenate([s.apply(x, self.lo, self.hi, self.calibration.image) for s in self.squeezers]))

    def verdict(self, x: np.ndarray, output: np.ndarray, rider_output: np.ndarray | None) -> Verdict:
        rows = x.shape[0]
        p = probabilities(output, self.calibration.outputs)
        per_row: dict[str, np.ndarray] = {}
        if "squeeze" in self.detectors:
            assert rider_output is not None
            copies = probabilities(rider_output, self.calibration.outputs)
            per_row["squeeze"] = squeeze_scores(p, [copies[i * rows:(i + 1) * rows] for i in range(len(self.squeezers))])
        if "anomaly" in self.detectors:
            per_row["anomaly"] = mahalanobis(features(x, self.calibration.image), self.calibration.mean,
                                             self.calibration.precision)
        if "confidence" in self.detectors:
            per_row["confidence"] = confidence_scores(p)
        if not np.isfinite(np.stack(list(per_row.values()))).all():  # NaN would sort past every reference
            raise FloatingPointError(f"a detector scored a non-finite value: {per_row}"[:300])
        placed = places(per_row, self.references)
        detector, worst = np.unravel_index(int(np.argmax(placed)), placed.shape)
        return Verdict({name: float(values.max()) for name, values in per_row.items()}, float(placed[detector, worst]),
                       self.threshold_for(rows), list(per_row)[int(detector)])


def check_guard(manifest: Manifest, config: GuardConfig) -> ModelGuard | None:
    """The model's guard, or None when it has none; ``CalibrationError`` naming the file when its
    calibration is missing, malformed, or made for another model or other settings."""
    if not config.enabled:
        return None
    return ModelGuard(manifest, config, load_calibration(manifest))


