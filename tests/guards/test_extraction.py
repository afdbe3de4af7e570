"""The model-extraction monitor: its signals on real digits and attacker streams, and its stages
(alarm, label-only, throttle, block, clear) around an in-memory worker running the real model."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.config import (
    ConfigError,
    ExtractionConfig,
    GuardConfig,
    load_config,
)
from gateway.guards.calibration import calibrate, data_digest, write_calibration
from gateway.guards.extraction import TECHNIQUE, ExtractionModel, Observations, Watch, check_extraction
from gateway.guards.watching import watch_key
from gateway.registry.manifest import load_manifest
from gateway.security.types import Principal
from gateway.stages import InferCall
from tests.guards.test_detectors import Harness as DetectorHarness

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "models" / "_data"
sys.path.insert(0, str(ROOT / "bench" / "security"))

import attackers  # noqa: E402

DEMO = Principal("demo", "service", frozenset({"inference"}), issuer="https://gw")
UNTRUSTED = Principal("guest", "service", frozenset({"inference", "untrusted"}), issuer="https://gw")
WATCH = ExtractionConfig(enabled=True)


@pytest.fixture(scope="module")
def calibrated(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("extraction") / "digits" / "1"
    shutil.copytree(models_root / "digits" / "1", folder)
    manifest = load_manifest(folder)
    data, digest = data_digest(DATA / "digits-calibration.npy")
    write_calibration(folder, calibrate(manifest, manifest.read_verified(), data, digest, ("levels:17",), (), 0.01))
    return folder


@pytest.fixture(scope="module")
def monitor(calibrated: Path) -> ExtractionModel:
    model = check_extraction(load_manifest(calibrated), WATCH)
    assert model is not None
    return model


@pytest.fixture(scope="module")
def victim(calibrated: Path) -> attackers.Oracle:
    session = ort.InferenceSession(str(calibrated / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: np.asarray(session.run(None, {"input": x.astype(np.float32)})[0])


def first_alarm(monitor: ExtractionModel, victim: attackers.Oracle, queries: np.ndarray) -> tuple[int | None, Watch]:
    """The query (1-based) at which the signals first fire, one row per request."""
    watch = Watch(WATCH.window)
    fired = None
    answers = victim(queries)
    for i in range(len(queries)):
        watch.observe(monitor.observations(queries[i:i + 1], answers[i:i + 1]))
        if fired is None and watch.assess(WATCH).fired:
            fired = i + 1
    return fired, watch


# -- the signals ----------------------------------------------------------------------------------

def test_natural_streams_raise_no_alarm(monitor: ExtractionModel, victim: attackers.Oracle) -> None:
    split = attackers.digits_split()
    rng = np.random.default_rng(7)
    for stream in attackers.benign_streams(split["all"], 5, rng, (300, 1797)):
        fired, watch = first_alarm(monitor, victim, stream)
        assert fired is None, (len(stream), watch.assess(WATCH).signals)
        assert watch.last_w is not None and watch.last_w > WATCH.prada_delta  # PRADA tested, and passed


def test_a_client_repeating_one_input_raises_no_alarm(monitor: ExtractionModel, victim: attackers.Oracle) -> None:
    """A fixed probe, retries, a benchmark: the same input again and again teaches nothing. Even an
    unusual-looking one (its anomaly place in the calibration data's top quarter) is no alarm."""
    x = attackers.digits_split()["holdout"]
    places = monitor.observations(x, victim(x)).ood
    unusual = x[int(np.argmax(places > 0.75))][None]
    fired, watch = first_alarm(monitor, victim, np.repeat(unusual, 400, axis=0))
    assert fired is None and watch.queries == 400 and len(watch.ood) == 1 and not watch.distances


def test_random_and_augmented_queries_raise_the_alarm_early(monitor: ExtractionModel, victim: attackers.Oracle) -> None:
    rng = np.random.default_rng(1)
    noise = rng.uniform(0, 16, (200, 64)).astype(np.float32)
    fired, watch = first_alarm(monitor, victim, noise)
    assert fired == WATCH.min_queries and watch.assess(WATCH).signals["ood"] > WATCH.z_alarm
    knockoff = attackers.augmented(attackers.digits_split()["train"][:200], rng)
    fired, _ = first_alarm(monitor, victim, knockoff)
    assert fired is not None and fired <= 100


def test_a_switch_after_innocent_queries_shows_at_once(monitor: ExtractionModel, victim: attackers.Oracle) -> None:
    """Jacobian augmentation after 100 natural seeds: the recent window catches the switch."""
    split = attackers.digits_split()
    seeds = split["train"][:100]
    steps = np.clip(seeds + 0.3 * 16 * np.sign(np.random.default_rng(2).normal(size=seeds.shape)), 0, 16)
    fired, _ = first_alarm(monitor, victim, np.concatenate([seeds, steps]).astype(np.float32))
    assert fired is not None and 100 < fired <= 140


def test_prada_fires_on_synthetic_probing_with_in_distribution_places(monitor: ExtractionModel) -> None:
    """Queries walking one pixel of one digit: each close to the last, the distances all alike
    (not normal); PRADA alone sees it."""
    digit = attackers.digits_split()["train"][0]
    walk = np.repeat(digit[None], 150, axis=0)
    walk[:, 20] = np.linspace(0, 16, 150)
    watch = Watch(WATCH.window)
    watch.observe(Observations(walk.astype(np.float16), np.zeros(150, np.int64), np.full(150, 0.5), np.full(150, 0.5)))
    assessment = watch.assess(WATCH)
    assert assessment.fired == ["prada"], assessment.signals


def test_observations_pack_and_unpack(monitor: ExtractionModel, victim: attackers.Oracle) -> None:
    x = attackers.digits_split()["holdout"][:7]
    obs = monitor.observations(x, victim(x))
    back = Observations.unpack(obs.pack() + [b"short"], monitor.width)
    assert len(back) == 7  # the malformed record is skipped
    np.testing.assert_array_equal(back.features, obs.features)
    np.testing.assert_array_equal(back.labels, obs.labels)
    np.testing.assert_allclose(back.ood, obs.ood, rtol=1e-6)


def test_memory_is_bounded_per_principal_and_in_principals(monitor: ExtractionModel, victim: attackers.Oracle) -> None:
    watch = Watch(500)
    rng = np.random.default_rng(3)
    for _ in range(30):
        x = rng.uniform(0, 16, (100, 64)).astype(np.float32)
        watch.observe(monitor.observations(x, victim(x)))
    assert len(watch.distances) == len(watch.ood) == 500 and watch.growing_rows <= 1024
    assert watch.nbytes() <= 2 * 1024 * 64 * 4 + 500 * 24  # buffers double: at most twice the rows


def test_configuration_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("""
[limits]
budget_inferences = ""
[models.digits.extraction]
enabled = true
signals = ["prada", "magic"]
prada_delta = 1.5
min_queries = 5
action = "throttle"
[models.digits.extraction.roles]
partner = "explode"
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    for fragment in ("'magic' is not one of", "prada_delta", "min_queries", "extraction.roles",
                     "extraction: throttle counts against limits.budget_inferences"):
        assert fragment in text, fragment


# -- the stages -----------------------------------------------------------------------------------

class Harness(DetectorHarness):
    def __init__(self, folder: Path, watch: ExtractionConfig, budget: str = "") -> None:
        super().__init__(folder, GuardConfig(), budget, extraction=watch)

    async def attack(self, principal: Principal, queries: int = 50) -> InferCall:
        """Random single-row queries until the alarm; the call that raised it."""
        rng = np.random.default_rng(0)
        for _ in range(queries):
            call, error = await self.infer(rng.uniform(0, 16, (1, 64)).astype(np.float32), principal)
            if call.ctx.events:
                return call
            assert error is None
        raise AssertionError("no alarm")


def probabilities(call: InferCall) -> np.ndarray:
    return call.outputs[0].array


@pytest.mark.anyio
async def test_alarm_switches_the_principal_to_label_only_until_cleared(calibrated: Path) -> None:
    h = Harness(calibrated, WATCH)
    x = attackers.digits_split()["holdout"][:1]
    before, _ = await h.infer(x, UNTRUSTED)
    assert np.count_nonzero(probabilities(before)) > 1  # full scores
    raised = await h.attack(DEMO)
    (event,) = raised.ctx.events
    assert event.detector == "extraction" and event.technique == TECHNIQUE == "AML.T0024.002"
    assert event.score > 1 and event.action == "label_only" and "ood" in event.scores
    assert raised.ctx.output_policy == "label_only"  # from the request that raised it
    after, error = await h.infer(x)
    assert error is None and after.ctx.output_policy == "label_only"
    assert sorted(np.unique(probabilities(after)).tolist()) == [0.0, 1.0]
    assert probabilities(after).argmax() == probabilities(before).argmax()  # the label is the model's
    assert any(f.kind == "extraction-alarm" for f in after.ctx.findings)
    other, _ = await h.infer(x, UNTRUSTED)
    assert other.ctx.output_policy is None  # only the principal that raised it
    cleared = await h.store.clear(DEMO.key, "digits")
    assert [a.principal for a in cleared] == [DEMO.key]
    again, _ = await h.infer(x)
    assert again.ctx.output_policy is None and np.count_nonzero(probabilities(again)) > 1
    assert h.store.watches.get(watch_key("digits", DEMO.key)).queries == 1  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_block_answers_403_of_a_documented_type_and_roles_pick_the_strictest(calibrated: Path) -> None:
    h = Harness(calibrated, dataclasses.replace(WATCH, action="record", roles=(("untrusted", "block"),)))
    _, error = await h.infer(np.zeros((1, 64), np.float32), UNTRUSTED)
    assert error is None
    raised = await h.attack(UNTRUSTED)
    assert raised.ctx.events[0].action == "block"
    _, error = await h.infer(attackers.digits_split()["holdout"][:1], UNTRUSTED)
    assert error is not None and error.status == 403 and error.type == "extraction-suspected"
    assert "an operator can clear it" in error.detail
    recorded = await h.attack(DEMO)  # record only: served as before
    assert recorded.ctx.events[0].action == "record" and recorded.ctx.output_policy is None


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["label_only", "throttle", "block", "record"])
async def test_an_alarm_in_force_refuses_explanations_unless_it_only_records(calibrated: Path, action: str) -> None:
    """An explanation is thousands of answers and a gradient: a principal whose answers an alarm
    restricts gets none, whatever the alarm does to its inferences."""
    h = Harness(calibrated, dataclasses.replace(WATCH, action=action))
    x = attackers.digits_split()["holdout"][:1]
    before, error = await h.infer(x, explain=True)
    assert error is None and before.answer is not None
    await h.attack(DEMO)
    after, error = await h.infer(x, explain=True)
    assert any(f.kind == "extraction-alarm" for f in after.ctx.findings)
    if action == "record":
        assert error is None and after.answer is not None
        return
    assert error is not None and error.status == 403 and error.type == "extraction-suspected", error
    assert "explanations" in error.detail and "an operator can clear it" in error.detail
    other, error = await h.infer(x, UNTRUSTED, explain=True)
    assert error is None and other.answer is not None  # only the principal that raised it
    await h.store.clear(DEMO.key, "digits")
    _, error = await h.infer(x, explain=True)
    assert error is None


@pytest.mark.anyio
async def test_throttle_spends_the_budget_faster(calibrated: Path) -> None:
    h = Harness(calibrated, dataclasses.replace(WATCH, action="throttle", throttle_cost=10), budget="100/day")
    await h.attack(DEMO)  # 50 queries, the last with its 9 extra
    statuses = []
    for _ in range(6):
        _, error = await h.infer(np.zeros((1, 64), np.float32))
        statuses.append(error.status if error else 200)
    assert statuses[:4] == [200] * 4 and 429 in statuses  # 59 + 4 × 10 = 99; the fifth passes 100


@pytest.mark.anyio
async def test_a_whole_budget_in_one_maximal_batch_is_watched(calibrated: Path) -> None:
    h = Harness(calibrated, WATCH)
    noise = np.random.default_rng(5).uniform(0, 16, (512, 64)).astype(np.float32)
    call, error = await h.infer(noise)
    assert error is None and call.ctx.events and call.ctx.output_policy == "label_only"
    assert call.ctx.events[0].scores["queries"] == 512


@pytest.mark.anyio
async def test_a_failing_monitor_serves_and_reports(calibrated: Path) -> None:
    h = Harness(calibrated, WATCH)
    broken = h.store.observe

    async def failing(*args: object) -> None:
        raise ConnectionError("storage gone")

    h.store.observe = failing  # type: ignore[method-assign]
    call, error = await h.infer(np.zeros((1, 64), np.float32))
    h.store.observe = broken  # type: ignore[method-assign]
    assert error is None and call.outputs
    assert "digits (extraction)" in h.health.degraded()
