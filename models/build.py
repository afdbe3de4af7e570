"""Build the demo models reproducibly (fixed seeds) into ``<root>/<name>/<version>/``.

Each model directory holds ``model.onnx`` and ``manifest.json`` (name, version, inputs and
outputs with datatype, shape and value domain, the ONNX file's SHA-256, the preferred device).

* ``digits``: a one-hidden-layer perceptron trained on scikit-learn's bundled ``load_digits``
  (FP32 ``[-1, 64]`` in ``[0, 16]`` to probabilities FP32 ``[-1, 10]``).
* ``resnetish``: a ResNet-18-shaped classifier (batch norm folded into the convolutions) with
  seeded random weights, about 11.7 M parameters, FP32 ``[-1, 3, 224, 224]`` to ``[-1, 1000]``.

Beside them, ``<root>/_data/<name>-calibration.npy`` holds clean inputs the model never trained on,
for ``gateway models calibrate``, and ``<root>/_data/<name>-holdout.npz`` (``x``, ``y``) another
such set that calibration does not see, for measuring false-positive rates (``bench/security``).
``_data`` can never be a model's name (names start with a letter or digit).

Usage: ``python models/build.py [--root models] [--only digits|resnetish] [--force]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9
SEED = 20261126


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="gateway-models-build",
        producer_version="1",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


Built = tuple[onnx.ModelProto, dict[str, Any], dict[str, np.ndarray]]
"""The model, its manifest, and its held-out data (``calibration``, ``holdout_x``, ``holdout_y``)."""


def build_digits() -> Built:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    # 60% to train on; the rest split evenly into calibration data and a hold-out set for measuring.
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    x_cal, x_test, _, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=1, stratify=y_rest)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0)
    clf.fit(x_train / 16.0, y_train)
    accuracy = float(clf.score(x_test / 16.0, y_test))

    w1, w2 = (w.astype(np.float32) for w in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    inits = [
        numpy_helper.from_array(np.array([1.0 / 16.0], dtype=np.float32), "scale"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("Mul", ["input", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    manifest = {
        "name": "digits",
        "version": "1",
        "description": "8x8 handwritten digit classifier trained on scikit-learn's load_digits",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 64], "domain": {"min": 0.0, "max": 16.0}}
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10], "domain": {"min": 0.0, "max": 1.0}}
        ],
        "batch": True,
        "device": "auto",
        "metrics": {"test_accuracy": round(accuracy, 4), "test_samples": int(len(y_test))},
    }
    data = {"calibration": x_cal.astype(np.float32), "holdout_x": x_test.astype(np.float32),
            "holdout_y": y_test.astype(np.int64)}
    return _finish(graph), manifest, data


class _ResNetBuilder:
    """Accumulates nodes and seeded He-initialised weights for a ResNet-18 graph."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.params = 0
        self._n = 0

    def _name(self, kind: str) -> str:
        self._n += 1
        return f"{kind}{self._n}"

    def _weight(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        self.params += array.size
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, gain: float = 1.0) -> str:
        name = self._name("conv")
        std = gain * np.sqrt(2.0 / (cin * k * k))
        w = self._weight(f"{name}.w", self.rng.normal(0.0, std, (cout, cin, k, k)))
        b = self._weight(f"{name}.b", self.rng.normal(0.0, 0.01, (cout,)))
        self.nodes.append(
            helper.make_node(
                "Conv", [x, w, b], [name], kernel_shape=[k, k], strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        return name

    def relu(self, x: str) -> str:
        name = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [name]))
        return name

    def block(self, x: str, cin: int, cout: int, stride: int) -> str:
        out = self.relu(self.conv(x, cin, cout, 3, stride))
        # A small gain on the residual branch keeps random activations bounded over 8 blocks.
        out = self.conv(out, cout, cout, 3, 1, gain=0.3)
        shortcut = x if stride == 1 and cin == cout else self.conv(x, cin, cout, 1, stride)
        name = self._name("add")
        self.nodes.append(helper.make_node("Add", [out, shortcut], [name]))
        return self.relu(name)


def _smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seeded low-frequency images, about zero-mean and unit-variance, as normalized photographs are."""
    coarse = rng.normal(0.0, 1.0, (n, 3, 7, 7)) + rng.normal(0.0, 0.5, (n, 3, 1, 1))
    images = coarse.repeat(32, axis=2).repeat(32, axis=3)
    images += rng.normal(0.0, 0.1, images.shape)
    return np.clip(images, -10, 10).astype(np.float32)


def build_resnetish() -> Built:
    b = _ResNetBuilder(np.random.default_rng(SEED))
    x = b.relu(b.conv("input", 3, 64, 7, 2))
    pooled = "pool"
    b.nodes.append(
        helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    )
    x, cin = pooled, 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = b.block(x, cin, cout, stride)
        x = b.block(x, cout, cout, 1)
        cin = cout
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    b.nodes.append(helper.make_node("Flatten", ["gap"], ["features"], axis=1))
    fc_w = b._weight("fc.w", b.rng.normal(0.0, np.sqrt(1.0 / 512), (512, 1000)))
    fc_b = b._weight("fc.b", np.zeros(1000))
    b.nodes.append(helper.make_node("Gemm", ["features", fc_w, fc_b], ["logits"]))
    graph = helper.make_graph(
        b.nodes,
        "resnetish",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        b.inits,
    )
    manifest = {
        "name": "resnetish",
        "version": "1",
        "description": "ResNet-18-shaped image classifier with seeded random weights (load and GPU benchmarks)",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224], "domain": {"min": -10.0, "max": 10.0}}
        ],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
        "batch": True,
        "device": "auto",
        "metrics": {"parameters": int(b.params)},
    }
    rng = np.random.default_rng(SEED + 1)
    data = {"calibration": _smooth_images(rng, 96), "holdout_x": _smooth_images(rng, 32),
            "holdout_y": np.zeros(32, dtype=np.int64)}
    return _finish(graph), manifest, data


BUILDERS = {"digits": build_digits, "resnetish": build_resnetish}


def write(root: Path, name: str, force: bool) -> Path:
    target = root / name / "1"
    present = [target / "manifest.json", target / "model.onnx", root / "_data" / f"{name}-calibration.npy"]
    if all(p.exists() for p in present) and not force:
        print(f"{name}: present at {target} (use --force to rebuild)")
        return target
    started = time.monotonic()
    print(f"{name}: building ...", flush=True)
    model, manifest, held_out = BUILDERS[name]()
    data = model.SerializeToString()
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / "model.onnx.tmp"
    tmp.write_bytes(data)
    tmp.replace(target / "model.onnx")
    manifest["onnx"] = {"file": "model.onnx", "sha256": hashlib.sha256(data).hexdigest()}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    store = root / "_data"
    store.mkdir(exist_ok=True)
    np.save(store / f"{name}-calibration.npy", held_out["calibration"])
    np.savez(store / f"{name}-holdout.npz", x=held_out["holdout_x"], y=held_out["holdout_y"])
    extra = ", ".join(f"{k}={v}" for k, v in manifest["metrics"].items())
    print(f"{name}: wrote {target} ({len(data) / 1e6:.1f} MB, {extra}) in {time.monotonic() - started:.1f}s")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--only", choices=sorted(BUILDERS), action="append")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    for name in args.only or sorted(BUILDERS):
        write(args.root, name, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
