"""Which output is the model's scores: the first floating-point one declared ``[-1, classes]``
(``Manifest.scores``). A classifier converted from scikit-learn answers its label first and its
probabilities second; the guard's calibration, the guard, the extraction monitor and explanations
all judge the probabilities, and a model with no such output is refused with its outputs named."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gateway.guards.calibration import CalibrationError, calibrate, data_digest, write_calibration
from gateway.registry.manifest import load_manifest
from gateway.registry.signing import sign_model
from tests.conftest import model_version, start_gateway

W = np.array([[2.0, -1.0, 0.5], [-1.0, 3.0, 0.0], [0.5, 0.5, -2.0], [1.0, -2.0, 1.5]], np.float32)
ROW = [0.9, 0.1, 0.4, 0.7]
INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 4], "domain": {"min": 0.0, "max": 1.0}}]


def classifier(folder: Path, key: Path | None = None) -> bytes:
    """Label first (INT64 [-1]), then probabilities (FP32 [-1, 3]), as converted classifiers answer."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
         helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)],
        "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W, "w")])
    return model_version(folder, graph, INPUTS, [{"name": "label", "datatype": "INT64", "shape": [-1]},
                                                 {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}], key)


def pooled(folder: Path, key: Path | None = None) -> bytes:
    """One answer for the whole batch: [1, 3] whatever the rows."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
         helper.make_node("MatMul", ["mean", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["y"], axis=1)],
        "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [numpy_helper.from_array(W, "w")])
    return model_version(folder, graph, INPUTS, [{"name": "y", "datatype": "FP32", "shape": [1, 3]}], key)


def _calibrated(folder: Path, model: bytes, tmp: Path, key: Path | None = None) -> dict[str, Any]:
    np.save(tmp / "clean.npy", np.random.default_rng(0).uniform(0, 1, (300, 4)).astype(np.float32))
    data, digest = data_digest(tmp / "clean.npy")
    doc = calibrate(load_manifest(folder), model, data, digest, ("bits:4",), (), 0.05)
    if key is not None:
        write_calibration(folder, doc)
        sign_model(folder, key)  # the signature covers the calibration
    return doc


def test_calibration_is_made_on_the_probabilities_not_the_label(tmp_path: Path) -> None:
    """Once it was made on the label: 'logits', and thresholds of 0 for squeezing and confidence."""
    folder = tmp_path / "classifier" / "1"
    doc = _calibrated(folder, classifier(folder), tmp_path)
    assert doc["outputs"] == "probabilities"
    assert doc["thresholds"]["squeeze"] > 0 and doc["thresholds"]["confidence"] > 0


def test_a_model_without_scores_cannot_be_calibrated_and_says_what_it_answers(tmp_path: Path) -> None:
    folder = tmp_path / "pooled" / "1"
    model = pooled(folder)
    with pytest.raises(CalibrationError, match=r"scores output of shape \[-1, classes\].*answers y FP32 \[1, 3\]"):
        _calibrated(folder, model, tmp_path)


def test_the_guard_and_explanations_judge_the_scores(models_root: Path, pki: Path, tmp_path: Path) -> None:
    """Through a running gateway: the guard's confidence score of an answer is 1 - its top
    probability; an explanation's prediction is that probability. Once explanations read the
    label (prediction 0.0), and a model answering once per batch got a 500."""
    root, key = tmp_path / "models", pki / "keys" / "model-signing.key"
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    _calibrated(root / "classifier" / "1", classifier(root / "classifier" / "1", key), tmp_path, key)
    pooled(root / "pooled" / "1", key)
    guard = ('[models.classifier]\n[models.classifier.guard]\ndetectors = ["squeeze", "anomaly", "confidence"]\n'
             'squeezers = ["bits:4"]\ntarget_fpr = 0.05\naction = "record"\n[models.pooled]\n')
    gw = start_gateway(pki, tmp_path, root, sections=guard)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ROW}]}
    session = ort.InferenceSession(str(root / "classifier" / "1" / "model.onnx"))
    label, probabilities = session.run(None, {"x": np.array([ROW], np.float32)})
    try:
        with gw.client() as c:
            r = c.post("/v2/models/classifier/infer", json=body)
            assert r.status_code == 200, r.text
            scores = gw.record_of(r.headers["x-request-id"])["scores"]
            assert scores["confidence"] == pytest.approx(1 - float(probabilities[0].max()), abs=1e-5)

            r = c.post("/v2/models/classifier/explain", json=body)
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["target"] == int(label[0]) == int(probabilities[0].argmax())
            assert doc["prediction"] == pytest.approx(float(probabilities[0].max()), abs=1e-5)
            assert abs(doc["completeness_delta"]) < 0.05

            r = c.post("/v2/models/pooled/explain", json=body)
            assert r.status_code == 422, r.text
            assert "scores output of shape [-1, classes]" in r.json()["error"] and "y FP32 [1, 3]" in r.json()["error"]
        assert gw.record_of(r.headers["x-request-id"])["status"] == 422
    finally:
        gw.stop()
