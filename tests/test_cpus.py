"""The cores a process may use: affinity, and a container's CPU limit where it is lower."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cpus import available_cpus


@pytest.mark.parametrize("cpu_max,limit", [("max 100000", None), ("200000 100000", 2), ("150000 100000", 2),
                                           ("50000 100000", 1), ("not a limit", None)],
                         ids=["no-limit", "two", "one-and-a-half", "half", "unreadable"])
def test_a_container_limit_lowers_the_count_and_nothing_else_does(tmp_path: Path, cpu_max: str,
                                                                    limit: int | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "cpu.max") == (affinity if limit is None else min(affinity, limit))


def test_without_cgroup_v2_the_affinity_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert available_cpus(tmp_path / "absent") == 3
