"""The cuda image on a GPU host: ``resnetish`` served by the `cuda` image on the CUDA execution
provider, its answers equal to the `cpu` image's within 1e-4. Needs podman with NVIDIA's CDI
devices (nvidia-container-toolkit: ``nvidia-ctk cdi generate``), both images built
(``make image image-cuda``), the demo models (``make models``) and root, as the suite's
container tests do.

    python bench/cuda_image_check.py [--device nvidia.com/gpu=all] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway_client import Client  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.deploy.containers import credentials_for, podman, serving_folder, wait_for  # noqa: E402


def start(image: str, serving: Path, port: int, extra: list[str]) -> str:
    name = f"gateway-cuda-check-{port}"
    podman("rm", "-f", name, check=False)
    podman("run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL", "--cap-add", "SETUID,SETGID",
           "-p", f"127.0.0.1:{port}:{port}", *extra,
           "-v", f"{serving / 'gateway.toml'}:/etc/gateway/gateway.toml:ro",
           "-v", f"{serving / 'certs'}:/etc/gateway/certs:ro", "-v", f"{serving / 'keys'}:/etc/gateway/keys:ro",
           "-v", f"{serving / 'issuer'}:/etc/gateway/issuer", "-v", f"{serving / 'audit'}:/var/lib/gateway/audit",
           "-v", f"{serving / 'delivery'}:/models:ro", image)
    return name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="nvidia.com/gpu=all",
                        help='the CDI device given to the cuda container ("": none, to try the script on a CPU host)')
    parser.add_argument("--cpu-image", default="localhost/gateway:cpu")
    parser.add_argument("--cuda-image", default="localhost/gateway:cuda")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    x = np.random.default_rng(7).uniform(-1, 1, (4, 3, 224, 224)).astype(np.float32)
    answers, providers, names = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        gpu = ["--device", args.device, "-e", "GATEWAY__MODELS__RESNETISH__DEVICE=cuda"] if args.device else []
        for kind, image, extra in (("cpu", args.cpu_image, []), ("cuda", args.cuda_image, gpu)):
            port = free_port()
            init, serving = serving_folder(Path(tmp) / kind, ROOT / "models", port)
            name = start(image, serving, port, extra)
            names.append(name)
            with Client.from_credentials(credentials_for(init, port), "demo") as client:
                wait_for(client.ready, 300, f"the {kind} image", lambda n=name: podman("logs", n, check=False).stderr)
                providers[kind] = client.model_metadata("resnetish")["parameters"]["execution_providers"]
                answers[kind] = next(iter(client.infer("resnetish", x).values()))
        for name in names:
            podman("rm", "-f", name, check=False)
    difference = float(np.max(np.abs(answers["cuda"] - answers["cpu"])))
    result = {"providers": providers, "max_abs_difference": difference,
              "ok": providers["cuda"][:1] == ["CUDAExecutionProvider"] and difference <= 1e-4}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
