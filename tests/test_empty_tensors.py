"""Tensors with no elements (a zero in a dimension the model leaves open) are data like any other:
digested, sent to the worker, answered through the caller's output policy; never a 500."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from gateway.registry.signing import sign_model
from gateway_client.protocol.codec import Tensor, decode_tensor_message, encode_tensor_message
from tests.conftest import start_gateway

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _open_width_models(models_root: Path, root: Path, pki: Path) -> Path:
    """The demo models, with ``digits`` replaced by an element-wise model whose width is left open."""
    shutil.copytree(models_root / "resnetish", root / "resnetish")
    shutil.copytree(models_root / "digits", root / "digits", ignore=shutil.ignore_patterns("model.sig", "calibration.json"))
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", "w"])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", "w"])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["probabilities"])], "g", [x], [y])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    folder = root / "digits" / "1"
    (folder / "model.onnx").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["onnx"]["sha256"] = hashlib.sha256(data).hexdigest()
    manifest["inputs"][0]["shape"] = manifest["outputs"][0]["shape"] = [-1, -1]
    manifest["outputs"][0].pop("domain", None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    sign_model(folder, pki / "keys" / "model-signing.key")
    return root


def test_an_input_with_no_elements_is_answered_digested_and_recorded_and_not_explained(
        models_root: Path, pki: Path, tmp_path: Path) -> None:
    root = _open_width_models(models_root, tmp_path / "models", pki)
    gw = start_gateway(pki, tmp_path, root, digits='output = { policy = "label_only" }')
    try:
        with gw.client() as c:
            as_json = c.post("/v2/models/digits/infer", json={"inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 0], "data": []}]})
            body, length = encode_tensor_message("inputs", [Tensor("input", np.zeros((2, 0), np.float32))])
            header = json.loads(body[:length])
            header["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": True}}]
            head = json.dumps(header).encode()
            as_binary = c.post("/v2/models/digits/infer", content=head + body[length:],
                               headers={"Inference-Header-Content-Length": str(len(head)),
                                        "Content-Type": "application/octet-stream"})
            explain = c.post("/v2/models/digits/explain", json={"inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 0], "data": []}]})
            normal = c.post("/v2/models/digits/infer", json={"inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]})
        assert as_json.status_code == 200, as_json.text
        (out,) = as_json.json()["outputs"]
        assert (out["name"], out["shape"], out["data"]) == ("probabilities", [1, 0], [])
        assert as_binary.status_code == 200, as_binary.text
        n = int(as_binary.headers["inference-header-content-length"])
        (tensor,) = decode_tensor_message(as_binary.content, n, "outputs")
        assert tensor.array.shape == (2, 0) and tensor.array.dtype == np.float32
        assert explain.status_code == 422 and "has none" in explain.json()["error"], explain.text
        assert normal.status_code == 200 and normal.json()["outputs"][0]["data"] == [0.0, 0.0, 1.0], "label only"
        record = gw.record_of(as_json.headers["x-request-id"])
        assert record["status"] == 200 and record["output_policy"] == "label_only"
        assert [(d["shape"], d["bytes"], d["sha256"]) for d in record["inputs"]] == [([1, 0], 0, EMPTY_SHA256)]
        assert [(d["shape"], d["bytes"], d["sha256"]) for d in record["outputs"]] == [([1, 0], 0, EMPTY_SHA256)]
    finally:
        gw.stop()
