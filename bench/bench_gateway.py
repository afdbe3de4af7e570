"""Benchmark: the full gateway path over HTTPS + mTLS against the floor (in-process ONNX Runtime).

One run measures, for ``digits`` and ``resnetish`` at 1 and 16 concurrent clients:

* the floor: ``session.run`` on a batch of one, in this process, with the same thread settings
  as the gateway's worker (1 client: one caller in a loop; 16: sixteen threads sharing it);
* the gateway: a real ``gateway serve`` with its workers, driven by ``wrk`` (Debian) through
  ``wrk_mtls_shim.so``, an LD_PRELOAD shim that gives wrk a client certificate;

and prints requests/s, p50 and p99 latency, the ratio to the floor, and the CPU share of each
gateway and worker process (to see what limits a number). Requires ``wrk`` and a C compiler.

    python bench/bench_gateway.py [--seconds 10] [--processes 1] [--out bench/results/run.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.devsetup import init  # noqa: E402
from gateway_client.protocol.codec import Tensor, encode_tensor_message  # noqa: E402

MODELS = {
    "digits": {"shape": (1, 64), "low": 0.0, "high": 16.0, "threads": 1, "batch": 64, "encoding": "json"},
    "resnetish": {"shape": (1, 3, 224, 224), "low": -1.0, "high": 1.0, "threads": 2, "batch": 16, "encoding": "binary"},
}
CLIENTS = (1, 16)
LUA = """
local f = io.open(os.getenv("BENCH_BODY"), "rb"); wrk.body = f:read("*all"); f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE")
local hl = os.getenv("BENCH_HEADER_LENGTH")
if hl ~= "" then wrk.headers["Inference-Header-Content-Length"] = hl end
wrk.headers["Authorization"] = os.getenv("BENCH_AUTH")
"""
# Every policy of [limits] is evaluated but none can trip: what the limiter costs, not what it refuses.
HUGE = "1000000000/minute"
LIMITS = {
    "none": {"per_address": "", "per_principal": "", "per_principal_model": "", "global_limit": "",
             "budget_inferences": "", "budget_rows": ""},
    "memory": {"storage": "memory://", "per_address": HUGE, "per_principal": HUGE, "per_principal_model": HUGE,
               "global_limit": HUGE, "budget_inferences": "1000000000/day", "budget_rows": "1000000000/day"},
}
LIMITS["redis"] = {**LIMITS["memory"], "storage": "redis://127.0.0.1:{redis_port}/0"}
LIMITS["redis-before"] = {**LIMITS["redis"], "admission": "before"}
POLICY = """
[[rbac.rules]]
name = "bench"
roles = ["inference"]
verbs = ["infer", "metadata"]
"""


def floor(model: str, clients: int, seconds: float, device: str) -> dict[str, float]:
    import onnxruntime as ort

    spec = MODELS[model]
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(spec["threads"])
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(ROOT / "models" / model / "1" / "model.onnx"), options, providers=providers)
    x = np.random.default_rng(0).uniform(spec["low"], spec["high"], spec["shape"]).astype(np.float32)
    for _ in range(5):
        session.run(None, {"input": x})
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def loop() -> None:
        mine = []
        while (t := time.perf_counter()) < stop:
            session.run(None, {"input": x})
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_ms": 1e3 * latencies[len(latencies) // 2],
            "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)], "providers": session.get_providers()}  # type: ignore[dict-item]


def _bodies(tmp: Path) -> dict[str, tuple[Path, str, str]]:
    out = {}
    for model, spec in MODELS.items():
        x = np.random.default_rng(1).uniform(spec["low"], spec["high"], spec["shape"]).astype(np.float32)
        path = tmp / f"{model}.body"
        if spec["encoding"] == "json":
            doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
            path.write_text(json.dumps(doc))
            out[model] = (path, "application/json", "")
        else:
            body, n = encode_tensor_message("inputs", [Tensor("input", x)])
            path.write_bytes(body)
            out[model] = (path, "application/octet-stream", str(n))
    return out


def _cpu_ticks(pids: list[int]) -> dict[int, int]:
    ticks = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks[pid] = int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return ticks


def _descendants(pid: int) -> dict[int, str]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    children: dict[int, list[tuple[int, str]]] = {}
    for p, pp, args in rows:
        children.setdefault(int(pp), []).append((int(p), args))
    found, todo = {pid: "gateway"}, [pid]
    while todo:
        for child, args in children.get(todo.pop(), []):
            m = re.search(r"--name (\S+)", args)
            found[child] = f"worker:{m.group(1)}" if m else ("gateway" if "multiprocessing" in args or "gateway" in args else args[:30])
            todo.append(child)
    return found


def wrk(url: str, model: str, clients: int, seconds: float, body: tuple[Path, str, str], certs: Path,
        shim: Path, pids: dict[int, str], token: str) -> dict[str, object]:
    env = {**os.environ, "LD_PRELOAD": str(shim), "WRK_CLIENT_CERT": str(certs / "client-demo.pem"),
           "WRK_CLIENT_KEY": str(certs / "client-demo.key"), "BENCH_BODY": str(body[0]),
           "BENCH_CTYPE": body[1], "BENCH_HEADER_LENGTH": body[2], "BENCH_AUTH": f"Bearer {token}"}
    script = body[0].with_suffix(".lua")
    script.write_text(LUA)
    threads = min(clients, 2)
    before, t0 = _cpu_ticks(list(pids)), time.monotonic()
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s", str(script),
                          f"{url}/v2/models/{model}/infer"], capture_output=True, text=True, env=env, check=True).stdout
    after, wall = _cpu_ticks(list(pids)), time.monotonic() - t0
    hz = os.sysconf("SC_CLK_TCK")
    cpu: dict[str, float] = {}
    for pid, role in pids.items():
        if pid in before and pid in after:
            cpu[f"{role}[{pid}]"] = round(100 * (after[pid] - before[pid]) / hz / wall, 1)

    def latency(q: str) -> float:
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": latency("50"), "p99_ms": latency("99"), "non_2xx": int(errors.group(1)) if errors else 0,
            "cpu_percent": cpu, "raw": out}


def start_gateway(tmp: Path, processes: int, device: str, limits: dict[str, str] | None = None,
                  extra: str = "", server: str = "", model_tables: dict[str, str] | None = None,
                  ) -> tuple[subprocess.Popen[bytes], int, str]:
    """A gateway with the bench's models and limits (``server``: more ``[server]`` settings;
    ``model_tables``: more TOML after each model's table, a ``[models.NAME.guard]`` say); returns
    it, its port and a token for "demo". The models are a copy, signed (and, where their data is
    there, calibrated) with this run's key; the repository's own stay as they are. A second call
    with the same ``tmp`` reuses them."""
    models = tmp / "models"
    if not models.exists():
        for model in MODELS:
            shutil.copytree(ROOT / "models" / model, models / model,
                            ignore=shutil.ignore_patterns("model.sig", "calibration.json"))
        shutil.copytree(ROOT / "models" / "_data", models / "_data")
    port = int(os.environ.get("BENCH_PORT", "18443"))
    if not (tmp / "gateway.toml").exists():
        init(tmp, models, port=port)
    limits = LIMITS["none"] if limits is None else limits
    lines = [f"[server]\nport = {port}\nprocesses = {processes}\nlog_level = \"warning\"\n{server}",
             f'[tls]\ncert_file = "{tmp}/certs/server.pem"\nkey_file = "{tmp}/certs/server.key"\n'
             f'client_ca_file = "{tmp}/certs/ca.pem"\n',
             f'[issuer]\nurl = "https://localhost:{port}"\n[auth]\naudience = "https://localhost:{port}"\n', POLICY,
             "[limits]\n" + "".join(f'{k} = "{v}"\n' for k, v in limits.items()),
             extra, f'[models]\nroot = "{models}"\n']
    for model, spec in MODELS.items():
        lines.append(f"[models.{model}]\ndevice = \"{device}\"\nintra_op_threads = {spec['threads']}\n"
                     f"max_batch_size = {spec['batch']}\nmax_queue_delay_ms = 1.0\n{(model_tables or {}).get(model, '')}")
    (tmp / "bench.toml").write_text("\n".join(lines))
    with open(tmp / "gateway.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(tmp / "bench.toml")],
                                stdout=log, stderr=subprocess.STDOUT)
    import ssl

    import httpx

    ctx = ssl.create_default_context(cafile=str(tmp / "certs/ca.pem"))
    ctx.load_cert_chain(tmp / "certs/client-demo.pem", tmp / "certs/client-demo.key")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited: {(tmp / 'gateway.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"https://localhost:{port}/v2/health/ready", verify=ctx).status_code == 200:
                demo = json.loads((tmp / "credentials.json").read_text())["principals"]["demo"]
                token = httpx.post(f"https://localhost:{port}/oauth/token", data={"grant_type": "client_credentials"},
                                   auth=(demo["client_id"], demo["client_secret"]), verify=ctx).json()["access_token"]
                return proc, port, str(token)
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"gateway did not start: {(tmp / 'gateway.log').read_text()[-2000:]}")


def build_shim(tmp: Path) -> Path:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk, or `make test-tools`)")
    shim = ROOT / "bench" / "wrk_mtls_shim.so"
    if not shim.exists():
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(ROOT / "bench" / "wrk_mtls_shim.c"), "-ldl"], check=True)
    return shim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=1, help="gateway HTTP processes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    shim = build_shim(tmp)
    bodies = _bodies(tmp)
    rows = []
    for model in args.models:
        for clients in CLIENTS:
            print(f"floor   {model:10s} clients={clients:2d} ...", flush=True)
            rows.append({"path": "floor", "model": model, "clients": clients, **floor(model, clients, args.seconds, args.device)})
    proc, port, token = start_gateway(tmp, args.processes, args.device)
    try:
        pids = _descendants(proc.pid)
        for model in args.models:
            for clients in CLIENTS:
                print(f"gateway {model:10s} clients={clients:2d} ...", flush=True)
                wrk(f"https://127.0.0.1:{port}", model, clients, 2, bodies[model], tmp / "certs", shim, pids, token)
                rows.append({"path": "gateway", "model": model, "clients": clients,
                             **wrk(f"https://127.0.0.1:{port}", model, clients, args.seconds, bodies[model],
                                   tmp / "certs", shim, pids, token)})
    finally:
        proc.terminate()
        proc.wait(30)
    floors = {(r["model"], r["clients"]): r["rps"] for r in rows if r["path"] == "floor"}
    floor1 = {m: floors[(m, 1)] for m in args.models}
    print(f"\n{'path':8s} {'model':10s} {'clients':>7s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'/floor@N':>8s} {'/floor@1':>8s}  cpu% by process")
    for r in rows:
        ratio_n = r["rps"] / floors[(r["model"], r["clients"])]
        ratio_1 = r["rps"] / floor1[r["model"]]
        cpu = " ".join(f"{k}={v}" for k, v in r.get("cpu_percent", {}).items() if v >= 1)
        extra = f" non-2xx={r['non_2xx']}" if r.get("non_2xx") else ""
        print(f"{r['path']:8s} {r['model']:10s} {r['clients']:7d} {r['rps']:9.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{ratio_n:8.3f} {ratio_1:8.3f}  {cpu}{extra}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"processes": args.processes, "device": args.device, "seconds": args.seconds,
                                        "rows": [{k: v for k, v in r.items() if k != "raw"} for r in rows]}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
