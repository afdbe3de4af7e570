"""Load for the multi-host test: inferences spread over several gateways from one client host.

Run inside the client's network namespace; each thread sends ``digits`` inferences in turn to each
target until ``--seconds`` have passed, and every answer (or connection failure, status 0) becomes
one JSON line in ``--out``: time, target, status, Retry-After, the gateway's request id, the
refusing policy.

    python multihost_load.py --targets https://192.0.2.21:8443,https://192.0.2.22:8443 --ca ca.pem \\
        --cert client.pem --key client.key --token T --seconds 5 --out answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import ssl
import threading
import time

import httpx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--requests", type=int, default=0, help="stop after this many in all (0: by time only)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    targets = args.targets.split(",")
    context = ssl.create_default_context(cafile=args.ca)
    context.load_cert_chain(args.cert, args.key)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [args.rows, 64], "data": [1.0] * 64 * args.rows}]}
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()
    answers: list[dict[str, object]] = []
    sent = [0]

    def run(offset: int) -> None:
        clients = [httpx.Client(base_url=t, verify=context, timeout=10,
                                headers={"Authorization": f"Bearer {args.token}"}) for t in targets]
        turn = offset
        while time.monotonic() < deadline:
            with lock:
                if args.requests and sent[0] >= args.requests:
                    break
                sent[0] += 1
            index = turn % len(targets)
            turn += 1
            record: dict[str, object] = {"t": time.time(), "target": targets[index]}
            try:
                r = clients[index].post("/v2/models/digits/infer", json=body)
                record.update(status=r.status_code, retry_after=r.headers.get("retry-after"),
                              request_id=r.headers.get("x-request-id"),
                              policy=r.json().get("policy") if r.status_code == 429 else None)
            except (httpx.TransportError, ValueError) as exc:
                record.update(status=0, error=type(exc).__name__)
                time.sleep(0.05)
            with lock:
                answers.append(record)
        for c in clients:
            c.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(args.out, "w") as f:
        for a in answers:
            f.write(json.dumps(a) + "\n")


if __name__ == "__main__":
    main()
