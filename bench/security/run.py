"""Adversarial-input detection, measured through a running gateway, and what the guard costs.

For the ``digits`` model, guarded as ``gateway init`` configures it (squeeze with ``levels:17``,
anomaly and confidence, combined) at a target false-positive rate of 5% and the action ``flag``:

1. clean traffic: every row of the hold-out set (data neither training nor calibration saw),
   one request each, through the SDK: the measured false-positive rate;
2. white-box attacks from the adversarial-robustness-toolbox (ART), crafted offline on the served
   weights (``estimator.DigitsMLP``) from the correctly classified hold-out rows, then sent one
   per request: FGSM and PGD at ε 0.05–0.3 (of the [0, 1] range; ×16 on the model's scale) and
   Carlini-Wagner L2 at confidence 0 and 5; and the same attacks rounded to the integer grid (an
   attacker who knows the ``levels:17`` squeezer);
3. HopSkipJump, black-box, querying the gateway itself through the SDK;

and, for each, the attack's success (the label the gateway returns changed), the share of the
successful adversarial inputs the gateway flagged, and the ROC-AUC of the combined score (and of
each detector alone) against the clean hold-out scores, all read from the gateway's audit log.
Then the guard's cost: ``digits`` and ``resnetish`` at 16 clients (wrk, as ``bench_gateway``),
guard off and on, interleaved, in the same run.

    python bench/security/run.py [--samples 200] [--hsj-samples 20] [--seconds 10] [--out bench/SECURITY.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gateway  # noqa: E402
from estimator import DigitsMLP  # noqa: E402
from report import replace_section  # noqa: E402

from gateway.config import GuardConfig  # noqa: E402
from gateway.guards.guard import check_guard  # noqa: E402
from gateway.registry.manifest import load_manifest  # noqa: E402
from gateway_client import Client, ssl_context  # noqa: E402
from gateway_client.protocol.codec import Tensor, encode_tensor_message  # noqa: E402

HEADING = "# Adversarial-input detection through the gateway"
TARGET_FPR = 0.05
GUARD = {
    "digits": f"""[models.digits.guard]
detectors = ["squeeze", "anomaly", "confidence"]
squeezers = ["levels:17"]
target_fpr = {TARGET_FPR}
action = "flag"
""",
    "resnetish": """[models.resnetish.guard]
detectors = ["squeeze", "anomaly"]
squeezers = ["median:2"]
action = "record"
""",
}
DETECTORS = ("squeeze", "anomaly", "confidence", "combined")


class Gateway:
    def __init__(self, tmp: Path, guarded: bool) -> None:
        self.tmp = tmp
        tables = GUARD if guarded else None
        self.proc, self.port, self.token = bench_gateway.start_gateway(tmp, 1, "cpu", bench_gateway.LIMITS["none"],
                                                                       model_tables=tables)
        self.url = f"https://localhost:{self.port}"

    def client(self) -> Client:
        ctx = ssl_context(self.tmp / "certs" / "ca.pem", self.tmp / "certs" / "client-demo.pem",
                          self.tmp / "certs" / "client-demo.key")
        return Client(self.url, self.token, ssl_context=ctx)

    def scores(self) -> dict[str, dict[str, float]]:
        """Every request's detector scores, by request id, from the audit log."""
        out = {}
        for path in (self.tmp / "audit").rglob("*.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("kind") == "request" and "scores" in record:
                    out[record["request_id"]] = record["scores"]
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def send(client: Client, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One request per row: the returned labels, whether each was flagged, and the request ids."""
    labels, flagged, ids = [], [], []
    for row in rows:
        result = client.infer_result("digits", row[None].astype(np.float32), input_name="input")
        labels.append(int(result.outputs["probabilities"].argmax()))
        flagged.append(result.finding is not None)
        ids.append(result.request_id)
    return np.array(labels), np.array(flagged), ids


def auc(clean: np.ndarray, attacked: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(attacked) == 0:
        return float("nan")
    truth = np.r_[np.zeros(len(clean)), np.ones(len(attacked))]
    return float(roc_auc_score(truth, np.r_[clean, attacked]))


def attacks(model_path: Path) -> list[tuple[str, str, Any, bool]]:
    """(name, ε on [0, 1], ART attack, rounded to the integer grid)."""
    from art.attacks.evasion import CarliniL2Method, FastGradientMethod, ProjectedGradientDescentNumpy

    probs, logits = DigitsMLP(model_path), DigitsMLP(model_path, logits=True)
    out: list[tuple[str, str, Any, bool]] = []
    for eps in (0.05, 0.1, 0.2, 0.3):
        out.append(("FGSM", f"{eps}", FastGradientMethod(probs, eps=eps * 16), False))
        out.append(("PGD", f"{eps}", ProjectedGradientDescentNumpy(probs, eps=eps * 16, eps_step=eps * 16 / 8,
                                                                    max_iter=40, verbose=False), False))
    for confidence in (0.0, 5.0):
        out.append((f"CW-L2 (confidence {confidence:g})", "-", CarliniL2Method(
            logits, confidence=confidence, max_iter=50, binary_search_steps=5, learning_rate=1.0,
            initial_const=10.0, batch_size=256, verbose=False), False))
    out.append(("FGSM, rounded", "0.1", FastGradientMethod(probs, eps=1.6), True))
    out.append(("PGD, rounded", "0.1", ProjectedGradientDescentNumpy(probs, eps=1.6, eps_step=0.2, max_iter=40,
                                                                     verbose=False), True))
    out.append(("PGD, rounded", "0.3", ProjectedGradientDescentNumpy(probs, eps=4.8, eps_step=0.6, max_iter=40,
                                                                     verbose=False), True))
    out.append(("CW-L2 (confidence 5), rounded", "-", CarliniL2Method(
        logits, confidence=5.0, max_iter=50, binary_search_steps=5, learning_rate=1.0, initial_const=10.0,
        batch_size=256, verbose=False), True))
    return out


def evaluate(tmp: Path, samples: int, hsj_samples: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    with np.load(ROOT / "models" / "_data" / "digits-holdout.npz") as h:
        x, y = h["x"].astype(np.float32), h["y"]
    gw = Gateway(tmp, guarded=True)
    rows: list[dict[str, Any]] = []
    try:
        with gw.client() as client:
            labels, clean_flagged, clean_ids = send(client, x)
            correct = labels == y
            xs, ys = x[correct][:samples], y[correct][:samples]
            print(f"clean: {len(x)} hold-out rows, accuracy {correct.mean():.3f}, flagged {clean_flagged.mean():.3f}",
                  flush=True)
            crafted: list[tuple[str, str, np.ndarray, np.ndarray, dict[str, Any]]] = []
            model_path = tmp / "models" / "digits" / "1" / "model.onnx"
            for name, eps, attack, rounded in attacks(model_path):
                started = time.monotonic()
                adv = attack.generate(xs)
                if rounded:
                    adv = np.clip(np.round(adv), 0, 16)
                crafted.append((name, eps, adv.astype(np.float32), ys, {"seconds": time.monotonic() - started}))
            queries = {"requests": 0, "rows": 0, "flagged": 0}

            def predict(batch: np.ndarray) -> np.ndarray:
                out = []
                for i in range(0, len(batch), 64):
                    result = client.infer_result("digits", batch[i:i + 64].astype(np.float32), input_name="input")
                    queries["requests"] += 1
                    queries["rows"] += len(batch[i:i + 64])
                    queries["flagged"] += result.finding is not None
                    out.append(result.outputs["probabilities"])
                return np.concatenate(out)

            started = time.monotonic()
            blackbox = BlackBoxClassifier(predict, (64,), 10, clip_values=(0.0, 16.0))
            hsj = HopSkipJump(blackbox, targeted=False, norm=2, max_iter=20, max_eval=200, init_eval=20, verbose=False)
            adv = hsj.generate(xs[:hsj_samples])
            crafted.append(("HopSkipJump (black-box, through the gateway)", "-", adv.astype(np.float32),
                            ys[:hsj_samples], {"seconds": time.monotonic() - started, **queries}))
            results = []
            for name, eps, adv, truth, info in crafted:
                labels, flagged, ids = send(client, adv)
                results.append((name, eps, labels != truth, flagged, ids, info))
        time.sleep(0.5)
        scores = gw.scores()
        # The combined score does not depend on the target rate: the threshold the gateway would
        # hold a one-row request to at 1% is applied to the same recorded scores.
        folder = tmp / "models" / "digits" / "1"
        strict = check_guard(load_manifest(folder), GuardConfig(
            detectors=("squeeze", "anomaly", "confidence"), squeezers=("levels:17",), target_fpr=0.01))
        assert strict is not None
        threshold_1 = strict.threshold_for(1)
    finally:
        gw.stop()
    clean = {d: np.array([scores[i][d] for i in clean_ids]) for d in DETECTORS}
    summary = {"holdout_rows": len(x), "accuracy": float(correct.mean()), "fpr": float(clean_flagged.mean()),
               "fpr_1": float(np.mean(clean["combined"] > threshold_1)), "samples": len(xs)}
    for name, eps, success, flags, ids, info in results:
        hit = np.array(ids)[success]
        attacked = {d: np.array([scores[i][d] for i in hit]) for d in DETECTORS}
        rows.append({"attack": name, "eps": eps, "inputs": len(success), "success": float(success.mean()),
                     "successful": int(success.sum()),
                     "detected": float(flags[success].mean()) if success.any() else float("nan"),
                     "detected_1": float(np.mean(attacked["combined"] > threshold_1)) if success.any() else float("nan"),
                     **{f"auc_{d}": auc(clean[d], attacked[d]) for d in DETECTORS}, **info})
        print(f"{name} ε={eps}: success {rows[-1]['success']:.2f}, detected {rows[-1]['detected']:.3f}, "
              f"AUC {rows[-1]['auc_combined']:.3f}", flush=True)
    return rows, summary


def cost(tmp: Path, seconds: float) -> list[dict[str, Any]]:
    """Requests/s at 16 clients, guard off and on, interleaved (off, on, off, on)."""
    shim = bench_gateway.build_shim(tmp)
    bodies = {}
    with np.load(ROOT / "models" / "_data" / "digits-holdout.npz") as h:
        digit = h["x"][:1].astype(np.float32)
    image = np.load(ROOT / "models" / "_data" / "resnetish-calibration.npy")[:1]
    for model, x in (("digits", digit), ("resnetish", image)):  # clean inputs: nothing is flagged
        body, n = encode_tensor_message("inputs", [Tensor("input", x)])
        path = tmp / f"{model}.body"
        path.write_bytes(body)
        bodies[model] = (path, "application/octet-stream", str(n))
    out = []
    for guarded in (False, True, False, True):
        gw = Gateway(tmp, guarded)
        try:
            pids = bench_gateway._descendants(gw.proc.pid)
            for model in ("digits", "resnetish"):
                url = f"https://127.0.0.1:{gw.port}"
                bench_gateway.wrk(url, model, 16, 2, bodies[model], tmp / "certs", shim, pids, gw.token)
                r = bench_gateway.wrk(url, model, 16, seconds, bodies[model], tmp / "certs", shim, pids, gw.token)
                print(f"guard {'on ' if guarded else 'off'} {model:10s} {r['rps']:9.1f} req/s (non-2xx {r['non_2xx']})",
                      flush=True)
                out.append({"guard": guarded, "model": model, "rps": r["rps"], "p50_ms": r["p50_ms"],
                            "p99_ms": r["p99_ms"], "non_2xx": r["non_2xx"]})
        finally:
            gw.stop()
    return out


def report(rows: list[dict[str, Any]], summary: dict[str, Any], costs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        HEADING,
        "",
        f"Produced by `python bench/security/run.py --samples {args.samples} --hsj-samples {args.hsj_samples} "
        f"--seconds {args.seconds:g}` on {time.strftime('%Y-%m-%d')}. Model `digits` (8×8, values 0–16), guard as "
        f"`gateway init` configures it (squeeze with `levels:17`, anomaly, confidence), target FPR {TARGET_FPR:.0%}, "
        "action `flag`; one request per input, through the SDK; scores read from the audit log.",
        "",
        "## Clean traffic",
        "",
        f"- hold-out rows (seen by neither training nor calibration): {summary['holdout_rows']}",
        f"- accuracy through the gateway: {summary['accuracy']:.3f}",
        f"- **measured false-positive rate: {summary['fpr']:.3f}** (target {TARGET_FPR}, bar ≤ {1.5 * TARGET_FPR:.3f})",
        f"- at the default target of 1% (the threshold the gateway places for it, applied to the same recorded "
        f"scores): {summary['fpr_1']:.3f}",
        "",
        "## Attacks",
        "",
        f"White-box attacks start from the first {summary['samples']} correctly classified hold-out rows. "
        "ε is on the [0, 1] scale (×16 on the model's). *Success*: the gateway's label changed. *Detected*: "
        "share of the successful adversarial inputs the gateway flagged. AUC: the successful adversarial inputs' "
        "scores against the clean hold-out scores (1.0 separates them perfectly, 0.5 is chance). *At 1%*: "
        "detected at the default target rate, from the same scores.",
        "",
        "| attack | ε | inputs | success | detected (5%) | at 1% | AUC combined | AUC squeeze | AUC anomaly | AUC confidence |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['eps']} | {r['inputs']} | {r['success']:.2f} | **{r['detected']:.3f}** | "
                     f"{r['detected_1']:.3f} | "
                     f"{r['auc_combined']:.3f} | {r['auc_squeeze']:.3f} | {r['auc_anomaly']:.3f} | {r['auc_confidence']:.3f} |")
    hsj = next((r for r in rows if r["attack"].startswith("HopSkipJump")), None)
    if hsj is not None:
        lines += ["", f"HopSkipJump sent {hsj['requests']} requests ({hsj['rows']} rows) to the gateway; "
                  f"{hsj['flagged']} of those requests were flagged while the attack ran."]
    if costs:
        lines += ["", "## Cost (16 clients, wrk, clean inputs; guard off and on interleaved in one run)", "",
                  "| model | off req/s | on req/s | on / off |", "|---|---|---|---:|"]
        for model in ("digits", "resnetish"):
            off = [c["rps"] for c in costs if c["model"] == model and not c["guard"]]
            on = [c["rps"] for c in costs if c["model"] == model and c["guard"]]
            lines.append(f"| {model} | {', '.join(f'{v:.1f}' for v in off)} | {', '.join(f'{v:.1f}' for v in on)} | "
                         f"**{np.mean(on) / np.mean(off):.2f}** |")
    lines += ["", "## What is not caught, and why", "",
              "- **An attacker who knows the squeezer and rounds to the grid.** Clean digits lie on the integer grid "
              "0..16, which `levels:17` reproduces, so any off-grid perturbation changes the squeezed prediction and is "
              "caught, whatever the attack. Rounded to the grid, an adversarial input *is* its own squeezed copy: the "
              "squeeze score is 0 (AUC 0.5 above) and only the anomaly and confidence scores are left. They catch "
              "large perturbations (PGD ε 0.3 rounded) but only a fifth to two fifths of small ones (ε 0.1, and "
              "CW-L2 rounded): such inputs are plausible digits near a decision boundary. Squeezers that do not "
              "coincide with the data's grid do worse: bit depths 2, 3 and 4 as the only detector caught 76% of FGSM "
              "ε 0.1 and 19% of FGSM ε 0.2 at 5% (measured offline on the same model while choosing the default, in "
              "line with the published figures).",
              "- **The 1% target** costs the rounded attacks most of their detections (the *at 1%* column).",
              "- **Other models**: `resnetish` has random weights and no natural data, so its detection is not "
              "measured; its guard is measured for cost only. Its squeezed copy doubles the rows each request "
              "runs, which bounds its throughput with squeezing on near 0.5 of guard off.",
              ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="hold-out rows each white-box attack starts from")
    parser.add_argument("--hsj-samples", type=int, default=20, help="rows HopSkipJump attacks (it queries the gateway)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per throughput measurement (0: skip cost)")
    parser.add_argument("--out", type=Path, default=None, help="write the report here (markdown)")
    parser.add_argument("--cost-only", action="store_true", help="measure only the guard's cost")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # ART's notices about frameworks it does not find
    tmp = Path(tempfile.mkdtemp(prefix="gateway-security-"))
    try:
        if args.cost_only:
            for row in cost(tmp, args.seconds):
                print(row)
            return 0
        rows, summary = evaluate(tmp, args.samples, args.hsj_samples)
        costs = cost(tmp, args.seconds) if args.seconds > 0 else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(rows, summary, costs, args)
    print(text)
    if args.out:
        replace_section(args.out, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
