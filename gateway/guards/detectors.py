"""The detectors' arithmetic, shared by calibration (offline) and the guard (per request).

Three scores, each larger for a less ordinary input, each per row:

* ``squeeze``: feature squeezing (Xu et al., NDSS 2018). Each squeezer makes a coarser copy of the
  input (fewer bit levels over the declared domain, or a median filter over image rows); the
  score is the largest L1 distance between the model's class probabilities on the input and on
  a copy. The copies ride in the same worker batch as the input.
* ``anomaly``: the Mahalanobis distance of the input's features (the input itself, or an average
  pool of an image to at most 8×8 per channel) from the calibration data's mean, with a shrunk
  covariance.
* ``confidence``: one minus the largest class probability (low confidence sits near a decision
  boundary, where minimal-perturbation attacks leave their inputs).

Each score is mapped to its place among the calibration scores (an empirical CDF, extended past
the largest so that order is kept); the combined score is the largest of those places, and its
threshold the quantile of the calibration's combined scores at the target false-positive rate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DETECTORS", "Reference", "Squeezer", "combined_scores", "places", "confidence_scores", "features", "mahalanobis",
    "parse_squeezer", "probabilities", "squeeze_scores",
]

DETECTORS = ("squeeze", "anomaly", "confidence")
POOLED_SIDE = 8
"""Images are average-pooled to at most this many cells a side for the anomaly features."""
FLAT_FEATURES = 256
"""Inputs with at most this many values are their own features."""
SHRINKAGE = 0.1
"""Weight of the scaled identity in the covariance (some pixels never vary in clean data)."""


@dataclass(frozen=True, slots=True)
class Squeezer:
    """``bits:N`` (2**N levels over the domain), ``levels:N`` (N levels over the domain: 17 over
    [0, 16] is the integer grid) or ``median:K`` (a K×K median filter)."""

    kind: str
    size: int

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.size}"

    def apply(self, x: np.ndarray, lo: float, hi: float, image: tuple[int, int, int] | None) -> np.ndarray:
        """The squeezed copy of ``x`` (rows first, float32)."""
        if self.kind in ("bits", "levels"):
            levels = float(2**self.size - 1 if self.kind == "bits" else self.size - 1)
            span = (hi - lo) or 1.0
            unit = np.clip((x - lo) / span, 0.0, 1.0)
            return (lo + np.round(unit * levels) / levels * span).astype(np.float32)
        assert image is not None, "median squeezers need an image shape"
        rows = x.shape[0]
        return _median(x.reshape(rows, *image), self.size).reshape(x.shape)


SQUEEZER = re.compile(r"(bits|levels|median):([0-9]{1,3})")
SIZES = {"bits": range(1, 9), "levels": range(2, 257), "median": range(2, 6)}


def parse_squeezer(spec: str) -> Squeezer:
    """``"bits:3"`` or ``"median:2"``; ``ValueError`` naming what is accepted otherwise."""
    m = SQUEEZER.fullmatch(spec.strip())
    if m is None or int(m.group(2)) not in SIZES[m.group(1)]:
        raise ValueError(f"squeezer {spec!r}: expected bits:1..8, levels:2..256 or median:2..5")
    return Squeezer(m.group(1), int(m.group(2)))


def _median(images: np.ndarray, k: int) -> np.ndarray:
    """A k×k median filter over the last two axes, edges repeated (as scipy.ndimage's "nearest"
    mode, with the window's origin at its upper-left for even k, as in the paper)."""
    h, w = images.shape[-2:]
    before, after = (k - 1) // 2, k // 2
    pad = [(0, 0)] * (images.ndim - 2) + [(before, after), (before, after)]
    padded = np.pad(images, pad, mode="edge")
    windows = [padded[..., i:i + h, j:j + w] for i in range(k) for j in range(k)]
    if k == 2:  # the median of four is the mean of the middle two: no sort (4x faster on images)
        a, b, c, d = windows
        total = a + b + c + d
        high = np.maximum(np.maximum(a, b), np.maximum(c, d))
        low = np.minimum(np.minimum(a, b), np.minimum(c, d))
        return np.asarray(((total - high - low) * 0.5).astype(np.float32))
    return np.asarray(np.median(np.stack(windows), axis=0).astype(np.float32))


def probabilities(outputs: np.ndarray, kind: str) -> np.ndarray:
    """Class probabilities per row from the model's first output (``probabilities`` or ``logits``)."""
    out = outputs.reshape(outputs.shape[0], -1).astype(np.float64)
    if kind == "probabilities":
        return out
    shifted = out - out.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def squeeze_scores(p: np.ndarray, squeezed: Sequence[np.ndarray]) -> np.ndarray:
    """The largest L1 distance per row between ``p`` and each squeezed copy's probabilities."""
    if not squeezed:
        return np.zeros(p.shape[0])
    return np.asarray(np.max([np.abs(p - q).sum(axis=1) for q in squeezed], axis=0))


def confidence_scores(p: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 - p.max(axis=1))


def features(x: np.ndarray, image: tuple[int, int, int] | None) -> np.ndarray:
    """The anomaly score's view of each row: the row itself when small, else a pooled image."""
    rows = x.shape[0]
    flat = x.reshape(rows, -1).astype(np.float64)
    if flat.shape[1] <= FLAT_FEATURES or image is None:
        return flat
    c, h, w = image
    sh, sw = min(POOLED_SIDE, h), min(POOLED_SIDE, w)
    hh, ww = h - h % sh, w - w % sw  # crop the remainder so the cells tile the image
    cells = flat.reshape(rows, c, h, w)[:, :, :hh, :ww].reshape(rows, c, sh, hh // sh, sw, ww // sw)
    return np.asarray(cells.mean(axis=(3, 5)).reshape(rows, -1))


def fit_gaussian(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision (inverse of the shrunk covariance) of calibration features."""
    mean = f.mean(axis=0)
    centered = f - mean
    cov = centered.T @ centered / max(1, f.shape[0] - 1)
    scale = float(np.trace(cov)) / cov.shape[0] or 1.0
    shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * scale * np.eye(cov.shape[0])
    return mean, np.linalg.inv(shrunk)


def mahalanobis(f: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = f - mean
    return np.asarray(np.sqrt(np.maximum(((d @ precision) * d).sum(axis=1), 0.0)))


class Reference:
    """One detector's calibration scores, sorted, with what placing a new score needs."""

    __slots__ = ("sorted", "top", "spread", "twice_n")

    def __init__(self, scores: np.ndarray) -> None:
        self.sorted = np.sort(np.asarray(scores, dtype=np.float64))
        n = len(self.sorted)
        self.top = float(self.sorted[-1])
        self.spread = float(self.sorted[(3 * n) // 4] - self.sorted[n // 4]) or abs(self.top) or 1.0
        self.twice_n = 2.0 * n

    def place(self, scores: np.ndarray) -> np.ndarray:
        """Each score's place among the calibration scores, in [0, 1] (mid-rank: a score tied with
        every reference, as 0 is when clean inputs never change, sits at 0.5), and above 1 past the
        largest (by how many inter-quartile spans), so that order is kept in the tail."""
        ref = self.sorted
        place = (np.searchsorted(ref, scores, side="left") + np.searchsorted(ref, scores, side="right")) / self.twice_n
        beyond = scores > self.top
        if beyond.any():
            place[beyond] = 1.0 + np.log1p((scores[beyond] - self.top) / self.spread)
        return np.asarray(place)


def places(scores: dict[str, np.ndarray], references: dict[str, Reference]) -> np.ndarray:
    """Each enabled detector's calibrated place (rows: detectors in ``scores``' order; columns: rows)."""
    return np.stack([references[name].place(values) for name, values in scores.items()])


def combined_scores(scores: dict[str, np.ndarray], references: dict[str, Reference]) -> np.ndarray:
    """The largest calibrated place of any enabled detector, per row."""
    return np.asarray(places(scores, references).max(axis=0))
