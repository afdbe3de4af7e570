"""The fuzz corpus as regression tests, and a short real atheris run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CORPUS = sorted((HERE / "corpus" / "oip").iterdir())


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_input_is_refused_cleanly_or_decoded(path: Path) -> None:
    from tests.fuzz.fuzz_oip import one_input

    one_input(path.read_bytes())  # raises (fails) on anything but the gateway's own 4xx


def test_a_short_atheris_run_finds_no_crash(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus" / "oip", corpus)
    result = subprocess.run(
        [sys.executable, str(HERE / "fuzz_oip.py"), "-runs=4000", "-seed=1", "-rss_limit_mb=2048", str(corpus)],
        capture_output=True, text=True, timeout=300, cwd=HERE.parents[1],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 4000 runs" in result.stderr
