"""GPU check: ``resnetish`` served with ``device = "cuda"`` through a real gateway.

Asserts that the worker reports the CUDA execution provider active, that its outputs match
in-process ONNX Runtime on the CPU to 1e-3, then runs the benchmark against the in-process GPU
floor. Run on a machine with an NVIDIA GPU and onnxruntime-gpu (see README, "GPU").
``--device cpu`` runs the same path on the CPU provider: a rehearsal on a machine without a GPU.

    python bench/gpu_check.py [--seconds 5] [--out results.json] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import json
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_gateway  # noqa: E402

from gateway_client.protocol.codec import Tensor, encode_tensor_message  # noqa: E402

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def check_outputs(tmp: Path, device: str = "cuda") -> dict[str, object]:
    """A batch of four through a gateway serving ``resnetish`` on ``device``: the provider its
    worker reports, and the answer against in-process ONNX Runtime on the CPU."""
    import onnxruntime as ort

    proc, port, token = bench_gateway.start_gateway(tmp, processes=1, device=device)
    try:
        ctx = ssl.create_default_context(cafile=str(tmp / "certs/ca.pem"))
        ctx.load_cert_chain(tmp / "certs/client-demo.pem", tmp / "certs/client-demo.key")
        with httpx.Client(base_url=f"https://localhost:{port}", verify=ctx, timeout=60,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            meta = client.get("/v2/models/resnetish")
            meta.raise_for_status()
            providers = meta.json()["parameters"]["execution_providers"]
            x = np.random.default_rng(3).uniform(-1, 1, (4, 3, 224, 224)).astype(np.float32)
            body, n = encode_tensor_message("inputs", [Tensor("input", x)])
            r = client.post("/v2/models/resnetish/infer", content=body,
                            headers={"Inference-Header-Content-Length": str(n),
                                     "Content-Type": "application/octet-stream"})
            r.raise_for_status()
            doc = r.json()
    finally:
        proc.terminate()
        proc.wait(30)
    got = np.array(doc["outputs"][0]["data"], np.float32).reshape(4, 1000)
    cpu = ort.InferenceSession(str(ROOT / "models/resnetish/1/model.onnx"), providers=["CPUExecutionProvider"])
    want = cpu.run(None, {"input": x})[0]
    max_abs = float(np.abs(got - want).max())
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    result = {"device": device, "providers": providers, "max_abs_diff": max_abs, "relative_l2": rel,
              "provider_active": providers[:1] == [PROVIDERS[device]], "within_1e-3": max_abs <= 1e-3}
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--processes", type=int, nargs="*", default=[1])
    parser.add_argument("--device", choices=sorted(PROVIDERS), default="cuda",
                        help="cpu: the same path without a GPU, to check the script itself")
    args = parser.parse_args()
    if not (ROOT / "models/resnetish/1/model.onnx").exists():
        subprocess.run([sys.executable, str(ROOT / "models/build.py")], check=True)
    result = check_outputs(Path(tempfile.mkdtemp(prefix="gateway-gpu-")), args.device)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    for processes in args.processes:
        out = args.out.with_name(f"bench-{args.device}-p{processes}.json") if args.out else None
        sys.argv = ["bench_gateway.py", "--device", args.device, "--seconds", str(args.seconds),
                    "--processes", str(processes)]
        if out:
            sys.argv += ["--out", str(out)]
        bench_gateway.main()
    return 0 if result["provider_active"] and result["within_1e-3"] else 1


if __name__ == "__main__":
    sys.exit(main())
