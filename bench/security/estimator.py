"""An ART classifier over the digits model's own weights, read from its ONNX file.

White-box attacks need the loss's and each class's gradient with respect to the input. The
digits model is ``softmax(relu(x / 16 · W1 + b1) · W2 + b2)``; this estimator computes the same
forward pass and its gradients in NumPy, so no deep-learning framework is needed to craft attacks
on exactly the weights the gateway serves (``tests/guards/test_estimator.py`` checks its outputs
against ONNX Runtime and its gradients against finite differences).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from art.estimators.classification.classifier import ClassifierClassLossGradients
from onnx import numpy_helper


class DigitsMLP(ClassifierClassLossGradients):  # type: ignore[misc]
    estimator_params = ClassifierClassLossGradients.estimator_params

    def __init__(self, model_path: Path, clip_values: tuple[float, float] = (0.0, 16.0), logits: bool = False) -> None:
        """``logits``: predict and differentiate the logits (Carlini-Wagner's margin is on them),
        not the probabilities."""
        self.logits = logits
        weights = {t.name: numpy_helper.to_array(t).astype(np.float64)
                   for t in onnx.load(str(model_path)).graph.initializer}
        self.scale = float(weights["scale"][0])
        self.w1, self.b1, self.w2, self.b2 = weights["w1"], weights["b1"], weights["w2"], weights["b2"]
        super().__init__(model=None, clip_values=clip_values)
        self._nb_classes = self.w2.shape[1]
        self._input_shape = (self.w1.shape[0],)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h = x.astype(np.float64) * self.scale @ self.w1 + self.b1
        a = np.maximum(h, 0.0)
        logits = a @ self.w2 + self.b2
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return h, logits, p

    def predict(self, x: np.ndarray, batch_size: int = 128, **kwargs: Any) -> np.ndarray:
        _, logits, p = self._forward(x)
        return (logits if self.logits else p).astype(np.float32)

    def _backward(self, x: np.ndarray, upstream_logits: np.ndarray) -> np.ndarray:
        h, _, _ = self._forward(x)
        grad_a = upstream_logits @ self.w2.T
        grad_h = grad_a * (h > 0)
        return (grad_h @ self.w1.T * self.scale).astype(np.float32)

    def loss_gradient(self, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> np.ndarray:
        """Gradient of the cross-entropy of ``y`` (one-hot or labels) with respect to ``x``."""
        _, _, p = self._forward(x)
        labels = y.argmax(axis=1) if y.ndim == 2 else y.astype(int)
        onehot = np.eye(self._nb_classes)[labels]
        return self._backward(x, p - onehot)

    def class_gradient(self, x: np.ndarray, label: Any = None, **kwargs: Any) -> np.ndarray:
        """Gradient of each class's probability (as ART's Keras and PyTorch classifiers without
        logits), shape (rows, classes or 1, features)."""
        _, _, p = self._forward(x)
        eye = np.eye(self._nb_classes)

        def upstream(labels: np.ndarray) -> np.ndarray:
            if self.logits:
                return eye[labels]
            return p * (eye[labels] - p[np.arange(len(x)), labels][:, None])

        if label is None:
            return np.stack([self._backward(x, upstream(np.full(len(x), c))) for c in range(self._nb_classes)], axis=1)
        labels = np.broadcast_to(np.asarray(label), (x.shape[0],)).astype(int)
        return self._backward(x, upstream(labels))[:, None, :]

    def fit(self, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> None:
        raise NotImplementedError("the served weights are fixed")

    def compute_loss(self, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> np.ndarray:
        _, _, p = self._forward(x)
        labels = y.argmax(axis=1) if y.ndim == 2 else y.astype(int)
        return -np.log(p[np.arange(len(x)), labels] + 1e-12)

    def get_activations(self, x: np.ndarray, layer: Any, batch_size: int = 128, framework: bool = False) -> np.ndarray:
        raise NotImplementedError

    @property
    def layer_names(self) -> list[str]:
        return []

    def save(self, filename: str, path: str | None = None) -> None:
        raise NotImplementedError
