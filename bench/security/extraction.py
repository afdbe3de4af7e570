"""Model extraction against ``digits``, through a running gateway, with the SDK.

1. Benign streams: natural digits, one principal, each stream a random subset in random order
   (lengths 540 to 1,797), sent in requests of 50 rows; after each, the operator API says whether
   an alarm is in force, and clears the principal for the next stream.
2. Five attackers (``attackers.py``), one query per request, up to ``--budget`` queries: JbDA
   with 100 natural seeds and λ 0.1, with 10 seeds, with λ 0.3, uniform random queries, and
   knockoff-style augmented natural digits. The monitor's action is ``record`` here, so the
   answers do not change: per attacker, the query at which the alarm fired (from the alarm) and
   the agreement of a copy trained on the queries up to it, and after 640 and 1,600 queries.
3. Output policies (``full``, ``round``, ``top_k``, ``noised`` ε 1, ``label_only``): the accuracy
   of the answers on the hold-out set, and the random and knockoff attackers' copies after 640 and
   1,600 queries.
4. Everything together, as ``gateway init`` configures it (alarm → ``label_only``): every
   attacker's copy after ``--budget`` queries.
5. The monitor's cost: ``digits`` at 16 clients (wrk), monitor off and on, interleaved, same run.

    python bench/security/extraction.py [--benign 70] [--budget 1600] [--seconds 10] [--out bench/SECURITY.md]

A copy's quality is its argmax agreement with the victim on the 360 hold-out digits (rows the
victim neither trained nor calibrated on). The copy is an MLP fitted to the answers as received.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attackers as A  # noqa: E402
import bench_gateway  # noqa: E402
from report import replace_section  # noqa: E402

from gateway_client import Client  # noqa: E402
from gateway_client.protocol.codec import Tensor, encode_tensor_message  # noqa: E402

HEADING = "# Model extraction through the gateway"
ADMIN = """
[[rbac.rules]]
name = "operator"
roles = ["admin"]
verbs = ["*"]
[[rbac.step_up]]
name = "admin-mfa"
verbs = ["admin:*"]
amr_any = ["mfa", "otp"]
"""
GUARD = '[models.digits.guard]\ndetectors = ["squeeze", "anomaly", "confidence"]\nsqueezers = ["levels:17"]\n'
KINDS = ("JbDA, 100 seeds, λ 0.1", "JbDA, 10 seeds, λ 0.1", "JbDA, 100 seeds, λ 0.3", "uniform random", "knockoff")
POLICIES = ("full", "round", "top_k", "noised", "label_only")


class Gateway:
    def __init__(self, tmp: Path, tables: str) -> None:
        self.tmp = tmp
        self.proc, self.port, _ = bench_gateway.start_gateway(tmp, 1, "cpu", bench_gateway.LIMITS["none"], extra=ADMIN,
                                                              model_tables={"digits": tables})
        creds = json.loads((tmp / "credentials.json").read_text())
        creds["gateway"], creds["token_endpoint"] = f"https://localhost:{self.port}", f"https://localhost:{self.port}/oauth/token"
        (tmp / "bench-credentials.json").write_text(json.dumps(creds))

    def client(self, who: str = "demo") -> Client:
        return Client.from_credentials(self.tmp / "bench-credentials.json", who)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def oracle(client: Client, counter: list[int]) -> A.Oracle:
    """One request per row, as an attacker probing the API would."""
    def ask(rows: np.ndarray) -> np.ndarray:
        out = []
        for row in rows:
            out.append(client.infer("digits", row[None].astype(np.float32), input_name="input")["probabilities"][0])
            counter[0] += 1
        return np.asarray(out)
    return ask


def attacks(ask: A.Oracle, budget: int, seed: int) -> dict[str, Iterator[tuple[np.ndarray, np.ndarray]]]:
    split = A.digits_split()
    pool = split["train"]
    rng = np.random.default_rng(seed)
    picks = {n: pool[rng.choice(len(pool), n, replace=False)] for n in (100, 10)}
    return {
        KINDS[0]: A.jbda(ask, picks[100], 0.1, budget),
        KINDS[1]: A.jbda(ask, picks[10], 0.1, budget),
        KINDS[2]: A.jbda(ask, picks[100], 0.3, budget),
        KINDS[3]: A.random_queries(ask, budget, rng),
        KINDS[4]: A.knockoff(ask, pool, budget, rng),
    }


def run_attack(gen: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    queries, answers = [], []
    for q, a in gen:
        queries.append(q)
        answers.append(a)
    return np.concatenate(queries), np.concatenate(answers)


def copy_agreement(queries: np.ndarray, answers: np.ndarray, n: int, victim: Callable[[np.ndarray], np.ndarray]) -> float:
    hold = A.digits_split()["holdout"]
    if n < 10:
        return float("nan")
    return A.agreement(A.train_copy(queries[:n], answers[:n]), hold, victim(hold).argmax(axis=1))


def benign(gw: Gateway, streams: int, seed: int) -> list[dict[str, Any]]:
    out = []
    principal = None
    with gw.client() as demo, gw.client("admin") as admin:
        for i, stream in enumerate(A.benign_streams(A.digits_split()["all"], streams, np.random.default_rng(seed))):
            for start in range(0, len(stream), 50):
                demo.infer("digits", stream[start:start + 50], input_name="input")
            alarms = admin.alarms()
            out.append({"length": len(stream), "alarm": alarms[0] if alarms else None})
            principal = principal or demo_key(gw)
            admin.clear_principal(principal, f"benchmark: benign stream {i} done")
            print(f"benign stream {i}: {len(stream)} queries, alarm {'yes' if alarms else 'no'}", flush=True)
    return out


def demo_key(gw: Gateway) -> str:
    return f"https://localhost:{gw.port}|demo"


def attackers_run(gw: Gateway, budget: int, victim: Callable[[np.ndarray], np.ndarray]) -> list[dict[str, Any]]:
    rows = []
    with gw.client() as demo, gw.client("admin") as admin:
        for kind, gen in attacks(oracle(demo, [0]), budget, seed=0).items():
            started = time.monotonic()
            queries, answers = run_attack(gen)
            alarms = admin.alarms()
            at = alarms[0]["queries"] if alarms else None
            row = {"kind": kind, "queries": len(queries), "alarm_at": at, "signals": alarms[0]["signals"] if alarms else {},
                   "at_alarm": copy_agreement(queries, answers, at, victim) if at else float("nan"),
                   "at_640": copy_agreement(queries, answers, 640, victim),
                   "at_budget": copy_agreement(queries, answers, budget, victim), "seconds": time.monotonic() - started}
            rows.append(row)
            print(kind, {k: v for k, v in row.items() if k != "kind"}, flush=True)
            admin.clear_principal(demo_key(gw), f"benchmark: {kind} done")
    return rows


def policies_run(tmp: Path, budget: int, victim: Callable[[np.ndarray], np.ndarray]) -> list[dict[str, Any]]:
    split = A.digits_split()
    rows = []
    for policy in POLICIES:
        gw = Gateway(tmp, GUARD + f'[models.digits.output]\npolicy = "{policy}"\n')
        try:
            with gw.client() as demo:
                answered = np.concatenate([demo.infer("digits", split["holdout"][i:i + 60], input_name="input")["probabilities"]
                                           for i in range(0, len(split["holdout"]), 60)])
                accuracy = float((answered.argmax(axis=1) == split["holdout_y"]).mean())
                gens = attacks(oracle(demo, [0]), budget, seed=1)
                row: dict[str, Any] = {"policy": policy, "accuracy": accuracy}
                for kind in (KINDS[3], KINDS[4]):
                    queries, answers = run_attack(gens[kind])
                    row[kind] = (copy_agreement(queries, answers, 640, victim), copy_agreement(queries, answers, budget, victim))
        finally:
            gw.stop()
        rows.append(row)
        print(row, flush=True)
    return rows


def defended_run(tmp: Path, budget: int, victim: Callable[[np.ndarray], np.ndarray]) -> list[dict[str, Any]]:
    gw = Gateway(tmp, GUARD + '[models.digits.extraction]\nenabled = true\naction = "label_only"\n')
    rows = []
    try:
        with gw.client() as demo, gw.client("admin") as admin:
            for kind, gen in attacks(oracle(demo, [0]), budget, seed=2).items():
                queries, answers = run_attack(gen)
                alarms = admin.alarms()
                rows.append({"kind": kind, "alarm_at": alarms[0]["queries"] if alarms else None,
                             "at_budget": copy_agreement(queries, answers, budget, victim)})
                print(rows[-1], flush=True)
                admin.clear_principal(demo_key(gw), f"benchmark: {kind} done")
    finally:
        gw.stop()
    return rows


def cost(tmp: Path, seconds: float) -> list[dict[str, Any]]:
    """digits at 16 clients, monitor off and on (signals that cannot fire on wrk's one repeated
    input, so that every request is watched), interleaved."""
    shim = bench_gateway.build_shim(tmp)
    body, n = encode_tensor_message("inputs", [Tensor("input", A.digits_split()["holdout"][:1])])
    (tmp / "digits.body").write_bytes(body)
    spec = (tmp / "digits.body", "application/octet-stream", str(n))
    watched = '[models.digits.extraction]\nenabled = true\naction = "record"\nsignals = ["ood", "boundary"]\nz_alarm = 100\n'
    out = []
    for on in (False, True, False, True):
        gw = Gateway(tmp, GUARD + (watched if on else ""))
        try:
            with gw.client() as demo:
                token = demo.auth.token() if demo.auth else ""
            pids = bench_gateway._descendants(gw.proc.pid)
            url = f"https://127.0.0.1:{gw.port}"
            bench_gateway.wrk(url, "digits", 16, 2, spec, tmp / "certs", shim, pids, token)
            r = bench_gateway.wrk(url, "digits", 16, seconds, spec, tmp / "certs", shim, pids, token)
            print(f"monitor {'on ' if on else 'off'} {r['rps']:9.1f} req/s (non-2xx {r['non_2xx']})", flush=True)
            out.append({"on": on, "rps": r["rps"], "p50_ms": r["p50_ms"], "non_2xx": r["non_2xx"]})
        finally:
            gw.stop()
    return out


def pct(v: float) -> str:
    return "–" if v != v else f"{100 * v:.1f}%"


def report(benign_rows: list[dict[str, Any]], attack_rows: list[dict[str, Any]], policy_rows: list[dict[str, Any]],
           defended: list[dict[str, Any]], costs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    false = [b for b in benign_rows if b["alarm"]]
    lengths = [b["length"] for b in benign_rows]
    lines = [HEADING, "",
             f"Produced by `python bench/security/extraction.py --benign {args.benign} --budget {args.budget} "
             f"--seconds {args.seconds:g}` on {time.strftime('%Y-%m-%d')}. Model `digits`, monitor as `gateway init` "
             "configures it (PRADA δ 0.90, `ood` and `boundary` z > 5 over the window and its last 50 queries); "
             "every query through a running gateway with the SDK. A copy's quality is its argmax agreement with the "
             "victim on the 360 hold-out digits; the copy is an MLP fitted to the answers as received (soft labels "
             "where the answers are scores).", "",
             "## Benign streams", "",
             f"- **{len(false)} false alarms in {len(benign_rows)} benign streams** of natural digits "
             f"({min(lengths)}–{max(lengths)} queries each, {sum(lengths)} in all).", ""]
    lines += ["## Attackers (monitor action `record`: the answers are unchanged)", "",
              "| attacker | queries | alarm at query | signals at the alarm | copy at the alarm | copy at 640 | "
              f"copy at {args.budget} |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in attack_rows:
        signals = ", ".join(f"{k} {v:.3g}" for k, v in r["signals"].items())
        lines.append(f"| {r['kind']} | {r['queries']} | {r['alarm_at'] or 'none'} | {signals} | **{pct(r['at_alarm'])}** | "
                     f"{pct(r['at_640'])} | {pct(r['at_budget'])} |")
    lines += ["", "## Output policies (monitor off)", "",
              f"| policy | hold-out accuracy | random: copy at 640 / {args.budget} | knockoff: copy at 640 / {args.budget} |",
              "|---|---:|---:|---:|"]
    for r in policy_rows:
        lines.append(f"| `{r['policy']}`{' (ε 1, the default)' if r['policy'] == 'noised' else ''} | {r['accuracy']:.3f} | {pct(r[KINDS[3]][0])} / {pct(r[KINDS[3]][1])} | "
                     f"{pct(r[KINDS[4]][0])} / {pct(r[KINDS[4]][1])} |")
    lines += ["", f"## Together: alarm → `label_only` (as `gateway init` configures it), {args.budget} queries each", "",
              f"| attacker | alarm at query | copy at {args.budget} |", "|---|---:|---:|"]
    for r in defended:
        lines.append(f"| {r['kind']} | {r['alarm_at'] or 'none'} | {pct(r['at_budget'])} |")
    lines += ["", "## Reading it", "",
              "- The monitor cannot tell natural queries from a customer's: a JbDA attacker's first 100 queries are "
              "natural digits, and the copy they give is most of the copy it will ever have; the alarm comes a few "
              "dozen synthetic queries later. Attackers whose queries are not natural (noise, augmented or "
              "synthetic data) are caught at the 50th query, the least the statistics need.",
              "- Label-only answers cost no accuracy and slow a copy trained on unnatural queries; against natural "
              "(knockoff) queries they change little: the labels of natural data are what a copy needs. Budgets "
              "(`limits.budget_inferences`) bound those.",
              "- `noised` at ε 1 is noise of the size of the probabilities themselves: it costs most of the accuracy. "
              "Choose ε from the accuracy you can give up (measure it with this script), or prefer `label_only`."]
    if costs:
        off = [c["rps"] for c in costs if not c["on"]]
        on = [c["rps"] for c in costs if c["on"]]
        lines += ["", "## Cost (digits, 16 clients, wrk; monitor off and on interleaved in one run)", "",
                  f"- off: {', '.join(f'{v:.0f}' for v in off)} req/s; on: {', '.join(f'{v:.0f}' for v in on)} req/s; "
                  f"**on / off {np.mean(on) / np.mean(off):.2f}**"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benign", type=int, default=70, help="benign streams")
    parser.add_argument("--budget", type=int, default=1600, help="queries per attacker")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per throughput measurement (0: skip cost)")
    parser.add_argument("--out", type=Path, default=None, help="replace this report's section in this markdown file")
    args = parser.parse_args()
    import onnxruntime as ort

    session = ort.InferenceSession(str(ROOT / "models" / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    def victim(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {"input": x.astype(np.float32)})[0])

    tmp = Path(tempfile.mkdtemp(prefix="gateway-extraction-"))
    try:
        gw = Gateway(tmp, GUARD + '[models.digits.extraction]\nenabled = true\naction = "record"\n')
        try:
            attack_rows = attackers_run(gw, args.budget, victim)
            benign_rows = benign(gw, args.benign, seed=3)
        finally:
            gw.stop()
        policy_rows = policies_run(tmp, args.budget, victim)
        defended = defended_run(tmp, args.budget, victim)
        costs = cost(tmp, args.seconds) if args.seconds > 0 else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(benign_rows, attack_rows, policy_rows, defended, costs, args)
    print(text)
    if args.out:
        replace_section(args.out, HEADING, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
