"""Output policies: what each role sees of the model's scores, and what the audit record says it saw."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from gateway.config import OutputConfig
from gateway.stages.outputs import apply_policy
from tests.conftest import start_gateway

RNG = np.random.default_rng(7)
SETTINGS = OutputConfig(top_k=3, decimals=2, epsilon=2.0)


def probabilities(rows: int = 50, classes: int = 10) -> np.ndarray:
    logits = RNG.normal(0, 3, (rows, classes))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_label_only_keeps_the_answer_and_nothing_else() -> None:
    p = probabilities()
    out = apply_policy(p, "label_only", SETTINGS, RNG)
    assert out.dtype == np.float32 and out.shape == p.shape
    assert (out.argmax(axis=1) == p.argmax(axis=1)).all()
    assert set(np.unique(out)) == {0.0, 1.0} and (out.sum(axis=1) == 1).all()


def test_top_k_keeps_the_k_largest() -> None:
    p = probabilities()
    out = apply_policy(p, "top_k", SETTINGS, RNG)
    assert ((out > 0).sum(axis=1) == 3).all()
    for row, kept in zip(p, out, strict=True):
        top = np.argsort(row)[-3:]
        np.testing.assert_array_equal(kept[top], row[top])
    assert (out.argmax(axis=1) == p.argmax(axis=1)).all()


def test_round() -> None:
    p = probabilities()
    np.testing.assert_array_equal(apply_policy(p, "round", SETTINGS, RNG), np.round(p, 2))


def test_noised_probabilities_stay_probabilities_and_logits_stay_logits() -> None:
    p = probabilities(2000)
    out = apply_policy(p, "noised", SETTINGS, RNG)
    assert out.dtype == np.float32 and (out >= 0).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(out - p).mean() > 0.01  # really perturbed
    logits = RNG.normal(0, 3, (2000, 10)).astype(np.float32)
    noise = apply_policy(logits, "noised", SETTINGS, RNG) - logits
    assert abs(float(np.abs(noise).mean()) - 1 / SETTINGS.epsilon) < 0.05  # Laplace(b): E|x| = b


@pytest.mark.parametrize("policy", ["full", "round", "top_k", "noised", "label_only"])
def test_an_answer_with_no_scores_passes_every_policy_as_it_is(policy: str) -> None:
    for shape in ((1, 0), (4, 0)):
        empty = np.empty(shape, np.float32)
        out = apply_policy(empty, policy, SETTINGS, RNG)
        assert out.shape == shape and out.dtype == np.float32


def test_the_least_revealing_role_policy_applies() -> None:
    settings = OutputConfig(policy="round", roles=(("partner", "label_only"), ("staff", "full")))
    assert settings.policy_for(frozenset({"staff"})) == "full"
    assert settings.policy_for(frozenset({"staff", "partner"})) == "label_only"
    assert settings.policy_for(frozenset({"other"})) == "round"


@pytest.mark.slow
def test_each_role_gets_its_policy_and_the_record_digests_what_it_got(pki: Path, tmp_path: Path,
                                                                      models_root: Path) -> None:
    sections = """
[models.digits.output]
policy = "full"
[models.digits.output.roles]
admin = "label_only"
"""
    gw = start_gateway(pki, tmp_path, models_root, sections=sections)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                        "data": np.tile(np.arange(64, dtype=np.float32) % 17, 2).tolist()}]}
    try:
        answers = {}
        for principal in ("demo", "admin"):
            with gw.client(principal) as c:
                r = c.post("/v2/models/digits/infer", json=body)
                assert r.status_code == 200, r.text
                answers[principal] = r
        full = np.array(answers["demo"].json()["outputs"][0]["data"], np.float32).reshape(2, 10)
        label = np.array(answers["admin"].json()["outputs"][0]["data"], np.float32).reshape(2, 10)
        assert full.sum() == pytest.approx(2.0, abs=1e-4) and len(np.unique(full)) > 2
        np.testing.assert_array_equal(label, np.eye(10, dtype=np.float32)[full.argmax(axis=1)])
        record = gw.record_of(answers["admin"].headers["x-request-id"])
        assert record["output_policy"] == "label_only"
        assert record["outputs"][0]["sha256"] == hashlib.sha256(label.tobytes()).hexdigest()
        assert "output_policy" not in gw.record_of(answers["demo"].headers["x-request-id"])
    finally:
        gw.stop()
