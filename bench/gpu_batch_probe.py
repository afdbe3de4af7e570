"""Times ``session.run`` per batch size on the worker's CUDA settings: first call and steady state.

Tells whether dynamic batching on CUDA pays a cost per new batch shape. Run where CUDA exists:
``python bench/gpu_batch_probe.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.workers.session import providers_for  # noqa: E402


def main() -> int:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(ROOT / "models/resnetish/1/model.onnx"), options,
                                   providers=providers_for("cuda", ort.get_available_providers()))
    print("providers", session.get_providers())
    rng = np.random.default_rng(0)
    print(f"{'batch':>5s} {'first ms':>9s} {'median ms':>9s} {'per row ms':>10s} {'concat ms':>9s}")
    for batch in (1, 2, 3, 4, 8, 13, 16, 16):
        rows = [rng.uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32) for _ in range(batch)]
        t = time.perf_counter()
        x = np.concatenate(rows)
        concat = time.perf_counter() - t
        t = time.perf_counter()
        session.run(None, {"input": x})
        first = time.perf_counter() - t
        times = []
        for _ in range(20):
            t = time.perf_counter()
            session.run(None, {"input": x})
            times.append(time.perf_counter() - t)
        median = statistics.median(times)
        print(f"{batch:5d} {1e3 * first:9.2f} {1e3 * median:9.2f} {1e3 * median / batch:10.3f} {1e3 * concat:9.2f}")
    inputs = {b: rng.uniform(-1, 1, (b, 3, 224, 224)).astype(np.float32) for b in (8, 13, 16)}
    for pair in ((16, 16), (16, 8), (16, 13)):
        times = []
        for k in range(40):  # every size already seen once above: only the switching remains
            x = inputs[pair[k % 2]]
            t = time.perf_counter()
            session.run(None, {"input": x})
            times.append(time.perf_counter() - t)
        print(f"alternating {pair}: median {1e3 * statistics.median(times):.2f} ms per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
