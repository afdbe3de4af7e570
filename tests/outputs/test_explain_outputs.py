"""Explanations of models whose first output is not one row of scores per input row: the scores are
the first two-dimensional floating-point output (a classifier's label, answered first, is not), and
a model whose answer does not follow the rows gets a 422, never a 500."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import model_version, start_gateway

W = np.array([[2.0, -1.0, 0.5], [-1.0, 3.0, 0.0], [0.5, 0.5, -2.0], [1.0, -2.0, 1.5]], np.float32)
ROW = [0.9, 0.1, 0.4, 0.7]


def _models(models_root: Path, root: Path, pki: Path) -> Path:
    """The demo models; ``classifier``, answering its label before its probabilities (as converted
    scikit-learn classifiers do); ``pooled``, one answer for the whole batch."""
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    weights = numpy_helper.from_array(W, "w")
    classifier = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
         helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)], "classifier", [x],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])], [weights])
    pooled = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1), helper.make_node("MatMul", ["mean", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["y"], axis=1)], "pooled", [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weights])
    key = pki / "keys" / "model-signing.key"
    declared = [{"name": "x", "datatype": "FP32", "shape": [-1, 4], "domain": {"min": 0.0, "max": 1.0}}]
    model_version(root / "classifier" / "1", classifier, declared,
                  [{"name": "label", "datatype": "INT64", "shape": [-1]},
                   {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}], key)
    model_version(root / "pooled" / "1", pooled, declared, [{"name": "y", "datatype": "FP32", "shape": [1, 3]}], key)
    return root


def test_explanations_judge_the_scores_and_refuse_answers_that_do_not_follow_the_rows(
        models_root: Path, pki: Path, tmp_path: Path) -> None:
    root = _models(models_root, tmp_path / "models", pki)
    gw = start_gateway(pki, tmp_path, root, sections="[models.classifier]\n[models.pooled]\n")
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ROW}]}
    try:
        with gw.client() as c:
            r = c.post("/v2/models/classifier/explain", json=body)
            assert r.status_code == 200, r.text
            doc = r.json()
            session = ort.InferenceSession(str(root / "classifier" / "1" / "model.onnx"))
            label, probabilities = session.run(None, {"x": np.array([ROW], np.float32)})
            assert doc["target"] == int(label[0]) == int(probabilities[0].argmax())
            assert abs(doc["prediction"] - float(probabilities[0].max())) < 1e-5
            assert abs(doc["completeness_delta"]) < 0.05

            r = c.post("/v2/models/pooled/explain", json=body)
            assert r.status_code == 422, r.text
            assert "one row of scores per evaluation" in r.json()["error"]
        assert gw.record_of(r.headers["x-request-id"])["status"] == 422
    finally:
        gw.stop()
