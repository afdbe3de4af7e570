"""Explanations through a running gateway: completeness, a deletion test, budgets, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest

from gateway.stages.explain import STEPS
from tests.conftest import Gateway, start_gateway
from tests.security.test_authz import _as, _tenant_token

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EXPLAIN = "/v2/models/digits/explain"


def body(row: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row.astype(np.float32).tolist()}]}


def holdout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(ROOT / "models" / "_data" / "digits-holdout.npz") as h:
        return np.asarray(h["x"], np.float32), np.asarray(h["y"])


def test_attributions_are_complete_and_point_at_what_matters(gateway: Gateway, models_root: Path) -> None:
    x, _ = holdout()
    session = ort.InferenceSession(str(models_root / "digits" / "1" / "model.onnx"))
    better, rows = 0, 30
    rng = np.random.default_rng(0)
    with gateway.client() as c:
        for row in x[:rows]:
            r = c.post(EXPLAIN, json=body(row))
            assert r.status_code == 200, r.text
            doc = r.json()
            attributions = np.array(doc["attributions"][0]["data"], np.float64).reshape(64)
            target = doc["target"]
            probs = session.run(None, {"input": row[None]})[0][0]
            assert target == int(probs.argmax())
            assert doc["prediction"] == pytest.approx(float(probs[target]), abs=1e-5)
            assert doc["evaluations"] == 2 * STEPS * 64 + 2
            # Completeness: the attributions add up to f(x) - f(baseline).
            assert abs(doc["completeness_delta"]) <= 0.05, doc["completeness_delta"]
            # Deletion: blanking the 10 most-attributed pixels costs the class more than 10 random ones.
            top = np.argsort(attributions)[-10:]
            rand = rng.choice(np.flatnonzero(row > 0), size=min(10, int((row > 0).sum())), replace=False)
            drop = []
            for pixels in (top, rand):
                blanked = row.copy()
                blanked[pixels] = 0
                drop.append(probs[target] - session.run(None, {"input": blanked[None]})[0][0][target])
            better += drop[0] > drop[1]
        assert better >= 0.8 * rows, f"{better} of {rows}"


def test_explanations_cost_their_evaluations_and_have_their_own_limit(pki: Path, tmp_path: Path,
                                                                      models_root: Path) -> None:
    evaluations = 2 * STEPS * 64 + 2
    limits = (f'per_address = "100000/minute"\nper_principal = "100000/minute"\nbudget_rows = ""\n'
              f'budget_inferences = "{evaluations + 5}/day"\nper_principal_explain = "3/minute"\n')
    gw = start_gateway(pki, tmp_path, models_root, limits=limits)
    row = holdout()[0][0]
    try:
        with gw.client() as c:
            assert c.post(EXPLAIN, json=body(row)).status_code == 200
            # The explanation used up the inference budget but for five: the sixth inference is refused.
            infer = {"inputs": body(row)["inputs"]}
            assert [c.post("/v2/models/digits/infer", json=infer).status_code for _ in range(6)] == [200] * 5 + [429]
            second = c.post(EXPLAIN, json=body(row))
            assert second.status_code == 429 and second.json()["type"].endswith("budget-exhausted")
        record = gw.record_of(second.headers["x-request-id"])
        assert record["route"] == "explain" and record["status"] == 429
        first = [r for r in gw.audit_records() if r.get("route") == "explain" and r["status"] == 200][0]
        assert first["inputs"][0]["shape"] == [1, 64] and first["worker"].startswith("digits")
    finally:
        gw.stop()


def test_explain_refusals(gateway: Gateway) -> None:
    row = holdout()[0][0]
    hidden = _tenant_token(gateway, "tenant-a")  # may use digits (not explain it), never sees resnetish
    with _as(gateway, hidden) as c:
        assert c.post("/v2/models/resnetish/explain", json=body(row)).status_code == 404  # as for inference
        assert c.post("/v2/models/no-such-model/explain", json=body(row)).status_code == 404
        assert c.post(EXPLAIN, json=body(row)).status_code == 403  # the verb is not granted
    with gateway.client() as c:
        two = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": [1.0] * 128}]}
        r = c.post(EXPLAIN, json=two)
        assert r.status_code == 422 and "one input row" in r.json()["error"]
        image = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224],
                             "data": [0.0] * (3 * 224 * 224)}]}
        r = c.post("/v2/models/resnetish/explain", json=image)
        assert r.status_code == 422 and "limited to 4096" in r.json()["error"]


@pytest.mark.anyio
async def test_a_model_whose_input_is_not_floating_point_gets_a_422_naming_it(models_root: Path) -> None:
    import dataclasses

    from starlette.datastructures import Headers

    from gateway.catalog import ModelEntry
    from gateway.config import ModelConfig
    from gateway.context import RequestContext
    from gateway.errors import InvalidInput
    from gateway.registry.manifest import load_manifest
    from gateway.stages import InferCall
    from gateway.stages.explain import Explain
    from gateway.units import Unit
    from gateway_client.protocol.codec import InferRequest

    manifest = load_manifest(models_root / "digits" / "1")
    tokens = dataclasses.replace(manifest, inputs=(dataclasses.replace(manifest.inputs[0], name="ids", datatype="INT64"),))
    call = InferCall(RequestContext("r1", 0.0, 1e12, "127.0.0.1", None), Headers(), {"name": "digits"}, None)  # type: ignore[arg-type]
    call.entry = ModelEntry(Unit("digits"), tokens, ModelConfig("digits"))
    call.request = InferRequest(inputs=[])
    with pytest.raises(InvalidInput, match=r"one floating-point input; digits takes ids \(INT64\)"):
        await Explain(None, None)(call)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("shape", [(), (1, 64), (64,)], ids=["scalar", "fixed-batch", "no-batch"])
async def test_a_model_without_an_open_batch_dimension_gets_a_422_naming_its_shape(
        models_root: Path, shape: tuple[int, ...]) -> None:
    """The evaluations go to the worker as one batch; a scalar input was a 500, a fixed batch of one
    ONNX Runtime's own error about 130 rows."""
    import dataclasses

    from starlette.datastructures import Headers

    from gateway.catalog import ModelEntry
    from gateway.config import ModelConfig
    from gateway.context import RequestContext
    from gateway.errors import InvalidInput
    from gateway.registry.manifest import load_manifest
    from gateway.stages import InferCall
    from gateway.stages.explain import Explain
    from gateway.units import Unit
    from gateway_client.protocol.codec import InferRequest, Tensor

    manifest = load_manifest(models_root / "digits" / "1")
    fixed = dataclasses.replace(manifest, inputs=(dataclasses.replace(manifest.inputs[0], shape=shape),))
    call = InferCall(RequestContext("r1", 0.0, 1e12, "127.0.0.1", None), Headers(), {"name": "digits"}, None)  # type: ignore[arg-type]
    call.entry = ModelEntry(Unit("digits"), fixed, ModelConfig("digits"))
    call.request = InferRequest(inputs=[])
    call.inputs = [Tensor("input", np.zeros(shape, np.float32))]
    with pytest.raises(InvalidInput, match=rf"first dimension is the batch, left open \(-1\); digits declares \{list(shape)}"):
        await Explain(None, None)(call)  # type: ignore[arg-type]


def test_the_path_rows_come_out_the_same_in_any_batches() -> None:
    """Each evaluation along the path, for each midpoint: every feature nudged up, then down."""
    from gateway.stages.explain import path_rows

    rng = np.random.default_rng(1)
    d, h = 5, 0.25
    points = rng.random((STEPS, d))
    expected = (points[:, None, :] + np.concatenate([np.eye(d), -np.eye(d)])[None] * h).reshape(-1, d)
    cuts = [0, 1, 7, 10, 33, 2 * STEPS * d]
    got = np.concatenate([path_rows(points, h, a, b) for a, b in zip(cuts, cuts[1:], strict=False)])
    assert np.array_equal(got, expected)


@pytest.mark.anyio
async def test_an_explanation_of_a_wide_input_is_built_a_batch_at_a_time(models_root: Path) -> None:
    """1,024 features are 32,770 evaluations (128 MiB as FP32): built whole, with the identity
    matrices around them, they took 656 MiB of the serving process at the peak (4,096 features
    would have taken ~10 GiB). Attributions of a linear model are exact: (x - b) * w[target]."""
    import dataclasses
    import tracemalloc

    from starlette.datastructures import Headers

    from gateway.catalog import ModelEntry
    from gateway.config import Config, ModelConfig
    from gateway.context import RequestContext
    from gateway.registry.manifest import load_manifest
    from gateway.security.ratelimit import Limiter
    from gateway.security.types import Principal
    from gateway.stages import InferCall
    from gateway.stages.explain import BATCH_BYTES, Explain
    from gateway.units import Unit
    from gateway_client.protocol.codec import InferRequest, Tensor

    features, classes = 1024, 10
    weights = np.random.default_rng(2).standard_normal((classes, features)).astype(np.float32)
    batches: list[int] = []

    class LinearWorkers:
        async def infer(self, key: str, inputs: list[Tensor], deadline: float | None, picked: object,
                        limit: int | None = None) -> list[Tensor]:
            batches.append(inputs[0].array.nbytes)
            return [Tensor("probabilities", inputs[0].array.reshape(len(inputs[0].array), -1) @ weights.T)]

    digits = load_manifest(models_root / "digits" / "1")
    wide = dataclasses.replace(digits, inputs=(dataclasses.replace(digits.inputs[0], shape=(-1, features)),),
                               outputs=(dataclasses.replace(digits.scores, shape=(-1, classes)),))
    ctx = RequestContext("r1", 0.0, 1e12, "127.0.0.1", None)  # type: ignore[arg-type]
    ctx.principal = Principal("analyst", "service", frozenset({"analyst"}))
    call = InferCall(ctx, Headers(), {"name": "digits"}, None)  # type: ignore[arg-type]
    call.entry = ModelEntry(Unit("digits"), wide, ModelConfig("digits"))
    call.request = InferRequest(inputs=[])
    x = np.random.default_rng(3).random((1, features)).astype(np.float32)
    call.inputs = [Tensor("input", x)]
    config = Config()
    explain = Explain(LinearWorkers(), Limiter(config.limits, 10, 60))  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        await explain(call)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 96 << 20, f"{peak >> 20} MiB at the peak"
    assert max(batches) <= BATCH_BYTES and sum(batches) == (2 * STEPS * features + 2) * features * 4
    assert call.answer is not None
    doc = orjson.loads(call.answer.body)
    target = int(np.argmax(weights @ x[0]))
    baseline = digits.inputs[0].min or 0.0
    assert doc["target"] == target and doc["evaluations"] == 2 * STEPS * features + 2
    expected = (x[0].astype(np.float64) - baseline) * weights[target]
    assert np.allclose(doc["attributions"][0]["data"], expected, rtol=1e-3, atol=1e-3)
    assert abs(doc["completeness_delta"]) < 1e-2
