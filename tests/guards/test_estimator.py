"""The security benchmark's white-box estimator computes what the served model computes."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "security"))
with warnings.catch_warnings():  # ART announces the deep-learning frameworks it does not find
    warnings.simplefilter("ignore")
    from estimator import DigitsMLP


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    with np.load(ROOT / "models" / "_data" / "digits-holdout.npz") as h:
        return np.asarray(h["x"][:16], dtype=np.float32)


def test_predictions_match_onnx_runtime(models_root: Path, rows: np.ndarray) -> None:
    path = models_root / "digits" / "1" / "model.onnx"
    served = ort.InferenceSession(str(path)).run(None, {"input": rows})[0]
    np.testing.assert_allclose(DigitsMLP(path).predict(rows), served, atol=1e-5)


@pytest.mark.parametrize("logits", [False, True])
def test_gradients_match_finite_differences(models_root: Path, rows: np.ndarray, logits: bool) -> None:
    model = DigitsMLP(models_root / "digits" / "1" / "model.onnx", logits=logits)
    x = rows[:2].astype(np.float64)
    labels = np.array([3, 7])
    step = 1e-3
    loss_grad = model.loss_gradient(x, labels)
    class_grad = model.class_gradient(x, label=labels)[:, 0]
    for pixel in (10, 20, 43):
        up, down = x.copy(), x.copy()
        up[:, pixel] += step
        down[:, pixel] -= step
        numeric_loss = (model.compute_loss(up, labels) - model.compute_loss(down, labels)) / (2 * step)
        np.testing.assert_allclose(loss_grad[:, pixel], numeric_loss, rtol=1e-2, atol=1e-7)
        out_up, out_down = model._forward(up), model._forward(down)
        which = 1 if logits else 2  # logits or probabilities
        numeric_class = (out_up[which][np.arange(2), labels] - out_down[which][np.arange(2), labels]) / (2 * step)
        np.testing.assert_allclose(class_grad[:, pixel], numeric_class, rtol=1e-2, atol=1e-7)
