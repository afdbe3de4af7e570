"""A model's NaN and infinite outputs reach the caller: exactly in binary, as ``null`` in JSON (which
has neither), read back as NaN by the SDK and tritonclient; the request still gets its 200 and
its record."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from gateway_client import Client
from tests.conftest import client_context, model_version, start_gateway


def _log_model(models_root: Path, root: Path, pki: Path) -> Path:
    """The demo models, and ``log``: the natural logarithm, -inf at 0 and NaN below."""
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    model_version(root / "log" / "1", graph, [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
                  [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}], pki / "keys" / "model-signing.key")
    return root


def test_non_finite_outputs_reach_the_caller(models_root: Path, pki: Path, tmp_path: Path) -> None:
    root = _log_model(models_root, tmp_path / "models", pki)
    gw = start_gateway(pki, tmp_path, root, sections="[models.log]\n")
    x = np.array([[1.0, 0.0, -1.0]], np.float32)
    try:
        with gw.client() as c:
            r = c.post("/v2/models/log/infer", json={"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": x.reshape(-1).tolist()}]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [0.0, None, None]  # JSON has no NaN or infinity
        assert gw.record_of(r.headers["x-request-id"])["status"] == 200
        with Client(gw.url, gw.token(), ssl_context=client_context(gw.pki)) as sdk:
            exact = sdk.infer("log", {"x": x})["y"]
            as_json = sdk.infer("log", {"x": x}, binary=False)["y"]
        assert exact[0, 0] == 0.0 and exact[0, 1] == -np.inf and np.isnan(exact[0, 2])
        assert as_json[0, 0] == 0.0 and np.isnan(as_json[0, 1:]).all()
        triton = httpclient.InferenceServerClient(url=f"localhost:{gw.port}", ssl=True,
                                                  ssl_context_factory=lambda: client_context(gw.pki))
        tensor = httpclient.InferInput("x", [1, 3], "FP32")
        tensor.set_data_from_numpy(x, binary_data=False)
        result = triton.infer("log", [tensor], outputs=[httpclient.InferRequestedOutput("y", binary_data=False)],
                              headers=gw.auth("demo"))
        y = result.as_numpy("y")
        assert y is not None and y[0, 0] == 0.0 and np.isnan(y[0, 1:]).all()
        triton.close()
    finally:
        gw.stop()
