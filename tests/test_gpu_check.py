"""``bench/gpu_check.py``, the one command a GPU machine runs, rehearsed here on the CPU provider:
the same gateway, credentials and comparison, so the script cannot drift from the code unseen."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_passes_on_the_cpu_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_PORT", str(free_port()))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds bench/ to it; not for later tests
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    result = gpu_check.check_outputs(tmp_path, "cpu")

    assert result["providers"][:1] == ["CPUExecutionProvider"]
    assert result["provider_active"] is True
    assert result["max_abs_diff"] <= 1e-3 and result["within_1e-3"] is True
