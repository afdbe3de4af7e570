"""How a worker builds its ONNX Runtime session: threads that spin unless a model says not to."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.workers.local import fetch_health
from gateway.workers.session import load_session
from tests.conftest import start_gateway

SPINNING = "session.intra_op.allow_spinning"


@pytest.mark.parametrize("spinning", [False, True])
def test_the_session_spins_as_told(models_root: Path, spinning: bool) -> None:
    model = (models_root / "resnetish" / "1" / "model.onnx").read_bytes()
    session = load_session(model, "cpu", 2, spinning=spinning)
    assert session.get_session_options().intra_op_num_threads == 2
    assert session.get_session_options().get_session_config_entry(SPINNING) == ("1" if spinning else "0")


def test_a_model_that_turns_spinning_off_gets_it_and_the_others_keep_the_default(
        pki: Path, tmp_path: Path, models_root: Path) -> None:
    gw = start_gateway(pki, tmp_path, models_root, digits="intra_op_threads = 2\nintra_op_spinning = false")
    try:
        threads = {}
        for model in ("digits", "resnetish"):
            health = fetch_health(str(gw.routes()[model]["workers"][0]["socket"]))
            assert health is not None
            threads[model] = health["threads"]
        assert threads == {"digits": {"intra_op": 2, "spinning": False}, "resnetish": {"intra_op": 1, "spinning": True}}
    finally:
        gw.stop()
