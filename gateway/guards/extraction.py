"""Model-extraction monitoring (MITRE ATLAS AML.T0024.002): the shape of one principal's queries.

A copy of a model is trained on the model's answers to many queries; budgets bound how many, and
this watches what they look like. Per principal and model (``Watch``), three signals:

* ``prada``: PRADA (Juuti et al., EuroS&P 2019) as published. Per predicted class a growing set
  of earlier queries; each new query's smallest L2 distance to its class's set joins the
  distance set D, and the query joins the growing set when that distance exceeds the class's
  threshold (the running mean minus one standard deviation of the distances that admitted
  members). Natural queries give normally distributed distances; synthetic ones (Jacobian
  augmentation) do not. An exact repeat of an earlier query is counted but not watched: it
  teaches a copy nothing. Past ``PRADA_MIN`` distances, the Shapiro–Wilk W of D (outliers beyond
  three standard deviations removed) below ``prada_delta`` raises the alarm.
* ``ood``: the place of each query's anomaly score among the calibration data's (the guard's
  Mahalanobis distance, ``gateway.guards.detectors``). Clean queries place uniformly on [0, 1];
  the mean place over the principal's last ``window`` queries, as a z-score against that
  (``(mean - 1/2) * sqrt(12 n)``), over the whole window and over its last ``min_queries`` (so
  that a switch after innocent-looking queries shows at once), rises when the queries come from elsewhere: random noise,
  augmented or synthetic data. PRADA misses exactly these.
* ``boundary``: the same for the confidence score (one minus the top probability): queries that
  crowd decision boundaries, as boundary-probing and active-learning attackers' do.

A z-score above ``z_alarm`` (default 5: a chance of about 3 in 10^7 per check for a clean stream)
raises the alarm once ``min_queries`` queries are in the window. The alarm's score is the largest
of the signals' ratios to their thresholds (above 1 is an alarm).

Everything is bounded: the growing sets hold at most ``GROWING_CAP`` rows in all, and D and the
places hold the last ``window`` queries. Features are the guard's (the row itself when small, an
8×8 average pool per channel of an image), sent to a shared store as float16.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from gateway.config import ExtractionConfig
from gateway.guards.calibration import Calibration, CalibrationError, load_calibration
from gateway.guards.detectors import Reference, confidence_scores, features, mahalanobis, probabilities
from gateway.registry.manifest import Manifest

__all__ = ["TECHNIQUE", "Assessment", "ExtractionModel", "Observations", "Watch", "check_extraction"]

TECHNIQUE = "AML.T0024.002"
"""MITRE ATLAS: exfiltration via ML inference API, extract ML model."""
PRADA_MIN = 100
"""PRADA tests normality once D holds more distances than this (as published)."""
GROWING_CAP = 1024
"""Rows kept in all of a principal's growing sets; past it, D still grows, the sets do not."""
CHECK_EVERY = 10
"""Shapiro–Wilk runs every this many queries, not on each (its cost grows with the window)."""


@dataclass(frozen=True)
class Observations:
    """What the monitor keeps of a request's rows."""

    features: np.ndarray
    """float16, rows × features."""
    labels: np.ndarray
    """The model's top class per row."""
    ood: np.ndarray
    """Anomaly places, clipped to [0, 1]."""
    boundary: np.ndarray
    """Confidence places, clipped to [0, 1]."""

    def __len__(self) -> int:
        return len(self.labels)

    def pack(self) -> list[bytes]:
        """One compact record per row (for a shared store): label, two places, the features."""
        head = np.zeros(len(self), dtype=[("label", "<u4"), ("ood", "<f4"), ("boundary", "<f4")])
        head["label"], head["ood"], head["boundary"] = self.labels, self.ood, self.boundary
        rows = self.features.astype("<f2")
        return [head[i].tobytes() + rows[i].tobytes() for i in range(len(self))]

    @classmethod
    def unpack(cls, records: list[bytes], width: int) -> Observations:
        size = 12 + 2 * width
        good = [r for r in records if len(r) == size]  # a record of another model's shape is skipped
        blob = b"".join(good)
        head = np.frombuffer(blob, dtype=[("label", "<u4"), ("ood", "<f4"), ("boundary", "<f4"),
                                          ("f", "<f2", (width,))]) if good else None
        if head is None:
            return cls(np.zeros((0, width), np.float16), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
        return cls(head["f"].astype(np.float16), head["label"].astype(np.int64), head["ood"].astype(np.float64),
                   head["boundary"].astype(np.float64))


@dataclass(frozen=True)
class Assessment:
    signals: dict[str, float]
    """``prada``: W (when tested); ``ood`` and ``boundary``: z-scores (when enough queries)."""
    ratios: dict[str, float]
    """Each signal against its threshold; above 1 is an alarm."""
    queries: int

    @property
    def score(self) -> float:
        return max(self.ratios.values(), default=0.0)

    @property
    def fired(self) -> list[str]:
        return [name for name, ratio in self.ratios.items() if ratio > 1.0]


class _Places:
    """A window of places with running sums, over all of it and over its most recent part."""

    def __init__(self, window: int, recent: int) -> None:
        self.all: deque[float] = deque(maxlen=window)
        self.recent: deque[float] = deque(maxlen=min(recent, window))
        self.total = self.recent_total = 0.0

    def extend(self, values: list[float]) -> None:
        for v in values:
            if len(self.all) == self.all.maxlen:
                self.total -= self.all[0]
            if len(self.recent) == self.recent.maxlen:
                self.recent_total -= self.recent[0]
            self.all.append(v)
            self.recent.append(v)
            self.total += v
            self.recent_total += v

    def __len__(self) -> int:
        return len(self.all)

    def z(self) -> float:
        """The larger z-score of the two means against a clean stream's (uniform on [0, 1])."""
        return max((self.total / len(self.all) - 0.5) * math.sqrt(12.0 * len(self.all)),
                   (self.recent_total / len(self.recent) - 0.5) * math.sqrt(12.0 * len(self.recent)))


class Watch:
    """One principal's queries to one model: PRADA's state and the windows of places."""

    def __init__(self, window: int, recent: int = 50) -> None:
        self.growing: dict[int, np.ndarray] = {}
        """Per class, its members' rows (capacity doubling; ``members`` says how many are used)."""
        self.members: dict[int, int] = {}
        self.growing_rows = 0
        self.threshold: dict[int, float] = {}
        self.admitted: dict[int, tuple[int, float, float]] = {}
        """Per class: count, sum and sum of squares of the distances that admitted members."""
        self.distances: deque[float] = deque(maxlen=window)
        self.ood = _Places(window, recent)
        self.boundary = _Places(window, recent)
        self.queries = 0
        self.last_w: float | None = None

    def observe(self, obs: Observations) -> None:
        rows = obs.features.astype(np.float32)
        fresh = [self._prada(rows[i], int(obs.labels[i])) for i in range(len(obs))]
        # A query repeated exactly teaches nothing new: it is counted, not watched (a client that
        # sends one input again and again is no extraction, whatever that input's places are).
        self.ood.extend([v for v, keep in zip(obs.ood.tolist(), fresh) if keep])
        self.boundary.extend([v for v, keep in zip(obs.boundary.tolist(), fresh) if keep])
        before, self.queries = self.queries, self.queries + len(obs)
        if self.queries // CHECK_EVERY != before // CHECK_EVERY:
            self.last_w = self._shapiro()

    def _admit(self, x: np.ndarray, label: int) -> None:
        if self.growing_rows >= GROWING_CAP:
            return
        buffer, n = self.growing.get(label), self.members.get(label, 0)
        if buffer is None or n == len(buffer):
            grown = np.empty((max(8, 2 * n), len(x)), dtype=np.float32)
            if buffer is not None:
                grown[:n] = buffer
            buffer = self.growing[label] = grown
        buffer[n] = x
        self.members[label] = n + 1
        self.growing_rows += 1

    def _prada(self, x: np.ndarray, label: int) -> bool:
        """PRADA's step for one query; False when it repeats a member of its class exactly."""
        n = self.members.get(label, 0)
        if n == 0:
            self._admit(x, label)
            self.threshold[label] = 0.0
            return True
        d_min = float(np.sqrt(((self.growing[label][:n] - x) ** 2).sum(axis=1).min()))
        if d_min == 0.0:
            return False
        self.distances.append(d_min)
        if d_min > self.threshold[label]:
            self._admit(x, label)
            count, s, ss = self.admitted.get(label, (0, 0.0, 0.0))
            count, s, ss = count + 1, s + d_min, ss + d_min * d_min
            self.admitted[label] = (count, s, ss)
            mean = s / count
            std = math.sqrt(max(ss / count - mean * mean, 0.0))
            self.threshold[label] = max(self.threshold[label], mean - std)
        return True

    def _shapiro(self) -> float | None:
        if len(self.distances) <= PRADA_MIN:
            return None
        d = np.fromiter(self.distances, dtype=np.float64)
        mean, std = d.mean(), d.std()
        kept = d[np.abs(d - mean) <= 3 * std] if std > 0 else d
        if len(kept) < 3 or np.ptp(kept) == 0:
            return 0.0  # every distance the same (a walk in equal steps): as far from natural as it gets
        return float(stats.shapiro(kept).statistic)

    def assess(self, config: ExtractionConfig) -> Assessment:
        signals: dict[str, float] = {}
        ratios: dict[str, float] = {}
        if "prada" in config.signals and self.last_w is not None:
            signals["prada"] = self.last_w
            ratios["prada"] = (1.0 - self.last_w) / (1.0 - config.prada_delta)
        if len(self.ood) >= config.min_queries:
            for name, places in (("ood", self.ood), ("boundary", self.boundary)):
                if name in config.signals:
                    signals[name] = places.z()
                    ratios[name] = signals[name] / config.z_alarm
        return Assessment(signals, ratios, self.queries)

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.growing.values()) + 3 * 8 * len(self.distances)


@dataclass
class ExtractionModel:
    """One model version's view for the monitor: the guard's calibration, placed the same way."""

    calibration: Calibration
    config: ExtractionConfig
    anomaly: Reference = field(init=False)
    confidence: Reference = field(init=False)

    def __post_init__(self) -> None:
        self.anomaly = Reference(self.calibration.scores["anomaly"])
        self.confidence = Reference(self.calibration.scores["confidence"])

    @property
    def width(self) -> int:
        return len(self.calibration.mean)

    def observations(self, x: np.ndarray, output: np.ndarray) -> Observations:
        c = self.calibration
        f = features(x, c.image)
        p = probabilities(output, c.outputs)
        if not (np.isfinite(f).all() and np.isfinite(p).all()):
            raise FloatingPointError("the input or the model's answer holds non-finite values")
        ood = np.clip(self.anomaly.place(mahalanobis(f, c.mean, c.precision)), 0.0, 1.0)
        boundary = np.clip(self.confidence.place(confidence_scores(p)), 0.0, 1.0)
        return Observations(f.astype(np.float16), np.argmax(p, axis=1), ood, boundary)


def check_extraction(manifest: Manifest, config: ExtractionConfig) -> ExtractionModel | None:
    """The model's extraction monitor, or None when it has none; ``CalibrationError`` naming the
    file when the calibration it needs is missing or made for another model."""
    if not config.enabled:
        return None
    calibration = load_calibration(manifest)
    missing = {"anomaly", "confidence"} - set(calibration.scores)
    if missing:
        raise CalibrationError(f"{calibration.path}: has no {sorted(missing)} scores, which the extraction "
                               "monitor places queries by; calibrate again")
    return ExtractionModel(calibration, config)
