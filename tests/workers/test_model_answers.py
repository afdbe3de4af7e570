"""A worker's answer is held to the model's declared outputs (names, datatypes, ranks, fixed
dimensions): a model its manifest misdescribes, or a compromised worker, gets a 502, and nothing
of its answer reaches the caller."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import model_version, start_gateway

BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 10], "data": [0.5] * 10}]}


def test_an_answer_outside_the_declared_outputs_is_a_502(models_root: Path, pki: Path, tmp_path: Path) -> None:
    """``wide`` declares [-1, 10] and answers [1, 4,000,000] (its graph leaves the width open, so
    admission cannot tell): once that went to the caller as a 16 MB answer of another shape than
    the model's metadata names."""
    root = tmp_path / "models"
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    graph = helper.make_graph([helper.make_node("Tile", ["x", "reps"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
                              [numpy_helper.from_array(np.array([1, 400_000], np.int64), "reps")])
    model_version(root / "wide" / "1", graph, [{"name": "x", "datatype": "FP32", "shape": [-1, 10]}],
                  [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}], pki / "keys" / "model-signing.key")
    gw = start_gateway(pki, tmp_path, root, sections="[models.wide]\n")
    try:
        with gw.client() as c:
            r = c.post("/v2/models/wide/infer", json=BODY)
            assert r.status_code == 502, r.text[:300]
            assert r.headers["content-type"] == "application/problem+json" and len(r.content) < 2000
            assert r.json()["type"] == "urn:gateway:problem:bad-model-answer"
            assert "answered y as FP32 [1, 4000000]; its manifest declares FP32 [-1, 10]" in r.json()["error"]
            record = gw.record_of(r.headers["x-request-id"])
            assert record["status"] == 502 and "outputs" not in record
            digits = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64}]}
            assert c.post("/v2/models/digits/infer", json=digits).status_code == 200
    finally:
        gw.stop()
