"""Calibration and the guard's stages on the real digits model, in this process (no gateway).

The worker is an in-memory transport around an ONNX Runtime session of the served model file, so
the squeezed copies, the scores and the actions are the gateway's own; only the sockets are left out.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from scipy.ndimage import median_filter
from starlette.datastructures import Headers

from gateway.app import explain_stages, infer_stages
from gateway.catalog import ModelTable
from gateway.config import (
    Config,
    ExtractionConfig,
    GuardConfig,
    IssuerConfig,
    LimitsConfig,
    ModelConfig,
    PolicyConfig,
    RuleConfig,
)
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.guards.calibration import CalibrationError, calibrate, data_digest, load_calibration, write_calibration
from gateway.guards.detectors import Reference, parse_squeezer
from gateway.guards.guard import check_guard
from gateway.guards.stages import GuardHealth, GuardInputs, GuardVerdict
from gateway.guards.watching import ExtractionGate, ExtractionWatch, WatchStore
from gateway.registry.manifest import load_manifest
from gateway.security.ratelimit import Limiter
from gateway.security.rbac import Policy
from gateway.security.types import Principal
from gateway.stages import Decoder, InferCall, InFlightBytes, run_stages
from gateway.stages.outputs import OutputPolicy
from gateway.units import Unit
from gateway.workers.memory import InMemoryTransport
from gateway.workers.pool import WorkerPool
from tests.test_stages import receive_once

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "models" / "_data"
DEMO = Principal("demo", "service", frozenset({"inference"}), issuer="https://gw")
ANALYST = Principal("analyst", "service", frozenset({"inference", "untrusted"}), issuer="https://gw")
GUARD = GuardConfig(detectors=("squeeze", "anomaly", "confidence"), squeezers=("levels:17",), target_fpr=0.05)


@pytest.fixture(scope="module")
def calibrated(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the digits version, calibrated on its held-out data."""
    folder = tmp_path_factory.mktemp("calibrated") / "digits" / "1"
    shutil.copytree(models_root / "digits" / "1", folder)
    manifest = load_manifest(folder)
    data, digest = data_digest(DATA / "digits-calibration.npy")
    write_calibration(folder, calibrate(manifest, manifest.read_verified(), data, digest, GUARD.squeezers, (), 0.05))
    return folder


def holdout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / "digits-holdout.npz") as h:
        return h["x"], h["y"]


def test_calibration_file_holds_scores_thresholds_and_digests(calibrated: Path) -> None:
    doc = json.loads((calibrated / "calibration.json").read_text())
    manifest = load_manifest(calibrated)
    assert doc["model"]["sha256"] == manifest.sha256
    assert doc["data"]["sha256"] == data_digest(DATA / "digits-calibration.npy")[1]
    assert doc["squeezers"] == ["levels:17"] and doc["outputs"] == "probabilities"
    rows = doc["data"]["rows"]
    assert all(len(doc["scores"][d]) == rows for d in ("squeeze", "anomaly", "confidence"))
    # Clean digits lie on the integer grid: squeezing to 17 levels changes nothing.
    assert max(doc["scores"]["squeeze"]) == 0.0
    assert set(doc["thresholds"]) == {"squeeze", "anomaly", "confidence", "combined"}


def test_threshold_keeps_its_false_positive_rate_on_unseen_clean_data(calibrated: Path) -> None:
    manifest = load_manifest(calibrated)
    guard = check_guard(manifest, GUARD)
    assert guard is not None
    x, _ = holdout()
    session = ort.InferenceSession(str(manifest.onnx_path))
    riders = guard.riders(x)
    assert riders is not None
    fired = [guard.verdict(x[i:i + 1], session.run(None, {"input": x[i:i + 1]})[0],
                           session.run(None, {"input": riders[i:i + 1]})[0]).fired for i in range(len(x))]
    assert np.mean(fired) <= 1.5 * GUARD.target_fpr  # the bar: within 1.5x of the target


@pytest.mark.parametrize("change", ["digest", "shape", "squeezers", "malformed", "oversized"])
def test_a_calibration_for_something_else_is_refused_naming_the_file(calibrated: Path, tmp_path: Path, change: str) -> None:
    folder = tmp_path / "digits" / "1"
    shutil.copytree(calibrated, folder)
    path = folder / "calibration.json"
    doc = json.loads(path.read_text())
    guard = GUARD
    if change == "digest":
        doc["model"]["sha256"] = "0" * 64
    elif change == "shape":
        doc["input"]["shape"] = [8, 8]
    elif change == "squeezers":
        guard = dataclasses.replace(GUARD, squeezers=("bits:3",))
    elif change == "malformed":
        del doc["anomaly"]
    else:  # read by the serving process when it follows a swap: never parsed whole
        doc["padding"] = " " * (65 << 20)
    path.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match=str(path) + (": over" if change == "oversized" else "")):
        check_guard(load_manifest(folder), guard)


def test_a_missing_calibration_says_how_to_make_one(models_root: Path, tmp_path: Path) -> None:
    shutil.copytree(models_root / "resnetish" / "1", tmp_path / "1", ignore=shutil.ignore_patterns("calibration.json"))
    with pytest.raises(CalibrationError, match="gateway models calibrate"):
        load_calibration(load_manifest(tmp_path / "1"))


def test_a_guard_on_a_model_it_cannot_judge_says_so_before_asking_for_a_calibration(
        models_root: Path, pki: Path, tmp_path: Path) -> None:
    from tests.test_datatypes import _every_datatype_model

    root = _every_datatype_model(models_root, tmp_path / "models", pki)
    with pytest.raises(CalibrationError, match="needs one floating-point input; this model takes ids INT64, mask BOOL"):
        load_calibration(load_manifest(root / "types" / "1"))


@pytest.mark.parametrize("datatype", ["FP16", "FP64"])
def test_a_model_of_half_or_double_precision_is_calibrated_in_its_own_datatype(tmp_path: Path, datatype: str) -> None:
    """The gateway sends such a model its own datatype (the squeezed copies too); so must calibration."""
    from onnx import TensorProto, helper

    from tests.conftest import model_version

    onnx_type = {"FP16": TensorProto.FLOAT16, "FP64": TensorProto.DOUBLE}[datatype]
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["p"], axis=1)], "g",
                              [helper.make_tensor_value_info("x", onnx_type, ["n", 4])],
                              [helper.make_tensor_value_info("p", onnx_type, ["n", 4])])
    folder = tmp_path / "soft" / "1"
    model = model_version(folder, graph, [{"name": "x", "datatype": datatype, "shape": [-1, 4],
                                           "domain": {"min": 0, "max": 1}}],
                          [{"name": "p", "datatype": datatype, "shape": [-1, 4]}])
    np.save(tmp_path / "clean.npy", np.random.default_rng(0).uniform(0, 1, (200, 4)).astype(np.float32))
    data, digest = data_digest(tmp_path / "clean.npy")
    doc = calibrate(load_manifest(folder), model, data, digest, ("bits:2", "bits:3"), (), 0.01)
    assert doc["outputs"] == "probabilities" and len(doc["scores"]["squeeze"]) == 200
    assert 0 < doc["thresholds"]["combined"] and all(np.isfinite(v) for v in doc["thresholds"].values())


def test_median_squeezer_matches_scipy() -> None:
    images = np.random.default_rng(0).uniform(0, 16, (3, 1, 8, 8)).astype(np.float32)
    ours = parse_squeezer("median:3").apply(images.reshape(3, 64), 0, 16, (1, 8, 8)).reshape(images.shape)
    theirs = median_filter(images, size=(1, 1, 3, 3), mode="nearest")
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_two_by_two_median_is_the_mean_of_the_middle_two() -> None:
    images = np.random.default_rng(2).normal(size=(2, 3, 9, 7)).astype(np.float32)
    ours = parse_squeezer("median:2").apply(images.reshape(2, -1), -10, 10, (3, 9, 7)).reshape(images.shape)
    padded = np.pad(images, [(0, 0), (0, 0), (0, 1), (0, 1)], mode="edge")  # the window reaches right and down
    windows = np.stack([padded[..., i:i + 9, j:j + 7] for i in (0, 1) for j in (0, 1)])
    np.testing.assert_allclose(ours, np.median(windows, axis=0), rtol=1e-6, atol=1e-6)


def test_bits_squeezer_quantizes_over_the_domain() -> None:
    x = np.array([[0.0, 3.9, 4.1, 16.0]], dtype=np.float32)
    np.testing.assert_allclose(parse_squeezer("bits:2").apply(x, 0, 16, None), [[0.0, 16 / 3, 16 / 3, 16.0]], rtol=1e-6)
    for bad in ("bits:0", "bits:9", "median:1", "levels:1", "blur:2", "bits:2 "):
        if bad.strip() != "bits:2":
            with pytest.raises(ValueError, match="expected"):
                parse_squeezer(bad)


def test_tied_scores_sit_mid_rank_and_the_tail_keeps_order() -> None:
    zeros = np.zeros(100)
    assert Reference(zeros).place(np.array([0.0]))[0] == 0.5
    ref = np.sort(np.random.default_rng(1).normal(size=200))
    places = Reference(ref).place(np.array([-5.0, 0.0, 5.0, 50.0]))
    assert places[0] == 0.0 and 0.3 < places[1] < 0.7 and 1.0 < places[2] < places[3]


# -- the stages, around an in-memory worker running the real model --------------------------------

def config(guard: GuardConfig, budget: str = "", extraction: ExtractionConfig | None = None) -> Config:
    return Config(
        models=(ModelConfig("digits", guard=guard, extraction=extraction or ExtractionConfig()),),
        issuer=IssuerConfig(enabled=False),
        rbac=PolicyConfig(rules=(RuleConfig("inference", ("inference",), ("infer", "explain")),)),
        limits=LimitsConfig(budget_inferences=budget),
    )


class Harness:
    """The inference stages over an in-memory worker running the model in ``folder``, with the
    guard's stages, or (``extraction``) the extraction monitor's and the output policy."""

    def __init__(self, folder: Path, guard: GuardConfig, budget: str = "", extraction: ExtractionConfig | None = None) -> None:
        self.config = config(guard, budget, extraction)
        session = ort.InferenceSession(str(folder / "model.onnx"))
        self.worker = InMemoryTransport(lambda inputs: session.run(None, inputs), ["probabilities"])
        models = ModelTable(self.config, {Unit("digits"): load_manifest(folder)})
        pool = WorkerPool.of(self.config, {"digits": [self.worker]})
        for client in pool.workers["digits"]:
            client.healthy = True
        self.health = GuardHealth()
        self.limiter = Limiter(self.config.limits)
        self.decoder = Decoder(self.config.server)
        self.store = WatchStore(self.config)
        guards, verdicts, policies = (
            ([GuardInputs(self.health)], [GuardVerdict(self.health, self.limiter)], []) if extraction is None else
            ([ExtractionGate(self.store, self.limiter)], [ExtractionWatch(self.store, self.limiter, self.health)],
             [OutputPolicy()]))
        self.stages = infer_stages(self.config, models, Policy(self.config.rbac), self.limiter, pool, self.decoder,
                                   InFlightBytes(1 << 24, 1 << 22), guards, verdicts, policies)
        self.explain_stages = explain_stages(self.config, models, Policy(self.config.rbac), self.limiter, pool,
                                             self.decoder, InFlightBytes(1 << 24, 1 << 22),
                                             gates=[ExtractionGate(self.store, self.limiter, explain=True)])

    async def infer(self, rows: np.ndarray, principal: Principal = DEMO,
                    explain: bool = False) -> tuple[InferCall, GatewayError | None]:
        """``rows`` through the inference stages (``explain``: the explanation's) as ``principal``."""
        body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                                         "data": rows.reshape(-1).tolist()}]})
        ctx = RequestContext("r1", 0.0, 1e12, "127.0.0.1", None, principal=principal)
        call = InferCall(ctx, Headers(headers={"content-type": "application/json"}), {"name": "digits"}, receive_once(body))
        try:
            await run_stages(self.explain_stages if explain else self.stages, call)
        except GatewayError as exc:
            return call, exc
        return call, None


def off_grid(x: np.ndarray) -> np.ndarray:
    """A small off-grid push towards another class: what a gradient attack leaves."""
    return np.clip(x + 0.45, 0, 16).astype(np.float32)


@pytest.mark.anyio
async def test_squeezed_copies_ride_in_the_same_worker_call(calibrated: Path) -> None:
    h = Harness(calibrated, GUARD)
    x, _ = holdout()
    call, error = await h.infer(x[:3])
    assert error is None
    assert len(h.worker.calls) == 1 and h.worker.calls[0]["input"].shape == (6, 64)  # one round trip
    assert call.outputs[0].array.shape == (3, 10)  # the answer holds only the client's rows
    assert set(call.ctx.scores) == {"squeeze", "anomaly", "confidence", "combined"}
    assert call.ctx.inputs[0].shape == (3, 64)  # digests cover what the client sent, not the riders


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["record", "flag", "reject"])
async def test_actions(calibrated: Path, action: str) -> None:
    h = Harness(calibrated, dataclasses.replace(GUARD, action=action))
    x, _ = holdout()
    call, error = await h.infer(off_grid(x[:2]))
    assert [f.kind for f in call.ctx.findings] == ["adversarial-input"]
    event = call.ctx.events[0]
    assert event.action == action and event.technique.startswith("AML.T00") and event.score > event.threshold
    if action == "reject":
        assert error is not None and error.status == 422 and error.type == "adversarial-input"
        assert call.answer is None  # nothing of the output is returned
        return
    assert error is None and call.answer is not None
    headers = call.answer.headers or {}
    assert ("Gateway-Finding" in headers) == (action == "flag")
    if action == "flag":  # what was noticed, not by which detector or how much (no oracle)
        assert headers["Gateway-Finding"] == f'adversarial-input; technique="{event.technique}"'



@pytest.mark.anyio
async def test_per_role_action_takes_the_strictest(calibrated: Path) -> None:
    h = Harness(calibrated, dataclasses.replace(GUARD, action="record", roles=(("untrusted", "reject"),)))
    x, _ = holdout()
    assert (await h.infer(off_grid(x[:1])))[1] is None
    _, error = await h.infer(off_grid(x[:1]), ANALYST)
    assert error is not None and error.status == 422


@pytest.mark.anyio
async def test_throttle_counts_the_request_many_times(calibrated: Path) -> None:
    h = Harness(calibrated, dataclasses.replace(GUARD, action="throttle", throttle_cost=5), budget="6/day")
    x, _ = holdout()
    call, error = await h.infer(off_grid(x[:1]))  # 1 + 4 more of 6
    assert error is None and call.answer is not None
    assert (await h.infer(x[:1]))[1] is None  # 6 of 6
    _, error = await h.infer(x[:1])
    assert error is not None and error.status == 429


@pytest.mark.anyio
@pytest.mark.parametrize("on_error", ["record", "reject"])
async def test_a_failing_detector_falls_back_to_on_error(calibrated: Path, on_error: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(calibrated, dataclasses.replace(GUARD, on_error=on_error))
    guard = h.stages[0].models.find("digits", None).guard  # type: ignore[attr-defined]

    def broken(*args: Any) -> Any:
        raise np.linalg.LinAlgError("singular matrix")

    monkeypatch.setattr(guard, "verdict", broken)
    x, _ = holdout()
    call, error = await h.infer(x[:1])
    assert [f.kind for f in call.ctx.findings] == ["guard-error"]
    assert h.health.errors == {"digits": 1} and "digits" in h.health.degraded()
    if on_error == "record":
        assert error is None and call.answer is not None
    else:
        assert error is not None and error.status == 503 and error.type == "guard-unavailable"


def test_a_model_answering_nan_is_a_guard_error_not_a_detection(calibrated: Path) -> None:
    guard = check_guard(load_manifest(calibrated), GUARD)
    assert guard is not None
    x, _ = holdout()
    nan = np.full((1, 10), np.nan, np.float32)
    with pytest.raises(FloatingPointError, match="non-finite"):
        guard.verdict(x[:1], nan, nan)


@pytest.mark.anyio
@pytest.mark.parametrize("shape", ["zeros", "constant-max", "one-hot-pixel", "max-batch"])
async def test_inputs_crafted_against_the_detectors_get_an_answer(calibrated: Path, shape: str) -> None:
    h = Harness(calibrated, GUARD)
    rows = {
        "zeros": np.zeros((1, 64), np.float32),
        "constant-max": np.full((2, 64), 16.0, np.float32),
        "one-hot-pixel": np.eye(1, 64, 27, dtype=np.float32) * 16,
        "max-batch": np.tile(holdout()[0][:1], (512, 1)),
    }[shape]
    call, error = await h.infer(rows)
    assert error is None, error
    assert call.outputs[0].array.shape == (len(rows), 10)
    assert all(np.isfinite(v) for v in call.ctx.scores.values())
