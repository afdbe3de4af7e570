"""A worker's answer is held to the model's declared outputs (names, datatypes, ranks, fixed
dimensions, and for a model declared ``batch`` one row per input row, bounded in bytes before it
is read): a model its manifest misdescribes, or a compromised worker, gets a 502, and nothing of
its answer reaches the caller."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import model_version, start_gateway

BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 10], "data": [0.5] * 10}]}
X = [{"name": "x", "datatype": "FP32", "shape": [-1, 10]}]
Y = [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]


def _tiled(folder: Path, reps: tuple[int, int], width: str | int, key: Path, **manifest: object) -> None:
    """A model that answers ``x`` tiled ``reps`` times, whatever its graph declares of ``y``:
    [batch, ``width``]."""
    graph = helper.make_graph([helper.make_node("Tile", ["x", "reps"], ["y"])], folder.parent.name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
                              [numpy_helper.from_array(np.array(reps, np.int64), "reps")])
    model_version(folder, graph, X, Y, key, **manifest)


def test_an_answer_outside_the_declared_outputs_is_a_502(models_root: Path, pki: Path, tmp_path: Path) -> None:
    """``wide`` declares [-1, 10] and answers [1, 4,000,000] (its graph leaves the width open, so
    admission cannot tell): once that went to the caller as a 16 MB answer of another shape than
    the model's metadata names. ``doubled`` and ``flooded`` declare ``batch`` and answer 2 and
    400,000 rows to one: the first went to the caller whole, the second (16 MB) too, read whole
    by the serving process first; now ``flooded``'s answer is refused at the head of its frame,
    past the 64 KiB and 40 bytes that one row can hold."""
    root = tmp_path / "models"
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    key = pki / "keys" / "model-signing.key"
    _tiled(root / "wide" / "1", (1, 400_000), "width", key)
    _tiled(root / "doubled" / "1", (2, 1), 10, key, batch=True)
    _tiled(root / "flooded" / "1", (400_000, 1), 10, key, batch=True)
    gw = start_gateway(pki, tmp_path, root, sections="[models.wide]\n[models.doubled]\n[models.flooded]\n")
    try:
        with gw.client() as c:
            for model, error in (
                ("wide", "answered y as FP32 [1, 4000000]; its manifest declares FP32 [-1, 10]"),
                ("doubled", "doubled answered 2 rows of y to 1 input rows; its manifest declares one row per input row"),
                ("flooded", "model 'flooded' answered more than the gateway accepts for the request (its "
                            "signature's bound, or its worker's answers in flight); nothing of it was kept"),
            ):
                r = c.post(f"/v2/models/{model}/infer", json=BODY)
                assert r.status_code == 502, (model, r.text[:300])
                assert r.headers["content-type"] == "application/problem+json" and len(r.content) < 2000
                assert r.json()["type"] == "urn:gateway:problem:bad-model-answer"
                assert error in r.json()["error"]
                record = gw.record_of(r.headers["x-request-id"])
                assert record["status"] == 502 and "outputs" not in record
            log = gw.log.read_text()
            assert "answered past the gateway's bound" in log and "(at most 65576)" in log, log[-3000:]
            digits = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64}]}
            assert c.post("/v2/models/digits/infer", json=digits).status_code == 200
    finally:
        gw.stop()
