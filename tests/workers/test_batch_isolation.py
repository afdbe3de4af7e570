"""Batching never hands one request's rows to another, through a real gateway and real workers.

Two models whose outputs do not follow their inputs row for row (Reshape [n, 4] to [-1, 2]): one
says so (its output's first dimension is named ``m``, not ``n``), so its worker never joins
requests; the other declares ``n`` for both, so the first batch it answers shows it, its requests
run again alone, and it is not batched again. Before, 51 of 64 concurrent callers got rows of
other callers' inputs."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import model_version, start_gateway


def _reshaper(root: Path, name: str, output_rows: str, pki: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [output_rows, 2])],
        [numpy_helper.from_array(np.array([-1, 2], np.int64), "shape")])
    model_version(root / name / "1", graph, [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                  [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}], pki / "keys" / "model-signing.key")


def test_outputs_that_do_not_follow_the_rows_never_reach_another_caller(
        models_root: Path, pki: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    _reshaper(root, "honest", "m", pki)
    _reshaper(root, "liar", "n", pki)
    batching = "max_batch_size = 16\nmax_queue_delay_ms = 5\n"
    gw = start_gateway(pki, tmp_path, root, sections=f"[models.honest]\n{batching}[models.liar]\n{batching}")
    try:
        with gw.client() as c:
            def call(model: str, i: int) -> tuple[list[int], list[float]]:
                r = c.post(f"/v2/models/{model}/infer", json={"inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [float(i)] * 4}]})
                assert r.status_code == 200, r.text
                out = r.json()["outputs"][0]
                return out["shape"], out["data"]

            with ThreadPoolExecutor(16) as pool:
                for model in ("honest", "liar"):
                    answers = list(pool.map(lambda i, m=model: call(m, i), range(64)))
                    wrong = [(i, a) for i, a in enumerate(answers) if a != ([2, 2], [float(i)] * 4)]
                    assert not wrong, f"{model}: {len(wrong)} callers got other rows: {wrong[:3]}"
        with gw.client("admin") as c:
            metrics = c.get("/metrics").text
        joined = {m: sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                         if line.startswith("gateway_batch_size_sum") and f'model="{m}"' in line)
                  - sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("gateway_batch_size_count") and f'model="{m}"' in line)
                  for m in ("honest", "liar")}
        assert joined["honest"] == 0, "the honest model's requests were never joined"
        assert joined["liar"] <= 15, f"the liar was batched past its first batch: {joined}"
        logs = {p.name: p.read_text() for p in (tmp_path / "run").rglob("*.log")}  # the workers' own
        assert "cannot be batched; from now on each request runs alone" in logs["liar-0.log"]
        assert "cannot be batched" not in logs["honest-0.log"]
    finally:
        gw.stop()
