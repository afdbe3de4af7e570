"""Explanations: per-feature attributions for one input, by integrated gradients.

Integrated gradients (Sundararajan et al., 2017) from the baseline ``b`` (the input domain's
minimum, a blank input) to the input ``x``: attribution_i = (x_i − b_i) · mean over the path of
∂f/∂x_i, where ``f`` is the score of the class the model predicts for ``x``. The gradients are estimated model-agnostically by central
finite differences at ``STEPS`` midpoints of the path: 2·STEPS·features + 2 evaluations. They go
to the worker in batches of up to ``BATCH_BYTES``, not one round trip per feature, and each batch is
built just before it is sent: the whole set for 4,096 features is 2 GiB as FP32 (it was once built
at once, ~10 GiB at the peak in the serving process). By completeness the attributions add up to
f(x) − f(b); the answer reports the difference (``completeness_delta``).

Each evaluation is counted against the principal's budgets (an explanation reveals far more of
the model than an answer does), and explanations have their own rate limit
(``limits.per_principal_explain``).
"""

from __future__ import annotations

import numpy as np
import orjson

from gateway.access import principal_of
from gateway.errors import InvalidInput
from gateway.registry.manifest import Manifest, TensorSpec
from gateway.registry.signature import answer_bound, check_answer
from gateway.security.ratelimit import Charge, Limiter
from gateway.stages.base import Answer, InferCall, offload
from gateway.stages.infer import tensor_digest
from gateway.workers.pool import WorkerPool
from gateway_client.protocol.codec import Tensor
from gateway_client.protocol.datatypes import FLOATS

__all__ = ["BATCH_BYTES", "MAX_FEATURES", "STEPS", "Explain", "path_rows"]

STEPS = 16
MAX_FEATURES = 4096
"""Finite differences cost two evaluations per feature and step: 4,096 features are 131,074 rows."""
STEP_FRACTION = 0.01
"""The finite-difference step, as a share of the input domain's span."""
BATCH_BYTES = 8 << 20
"""The most input bytes of evaluations sent to the worker at once (and held in the serving process)."""


def path_rows(points: np.ndarray, h: float, start: int, stop: int) -> np.ndarray:
    """Rows ``start`` to ``stop`` of the evaluations along the path: for each of its points (one
    row of ``points`` per midpoint), each feature nudged up by ``h``, then each nudged down."""
    d = points.shape[1]
    index = np.arange(start, stop)
    step, j = np.divmod(index, 2 * d)
    rows: np.ndarray = points[step]  # a copy, one row per evaluation
    rows[np.arange(len(index)), j % d] += np.where(j < d, h, -h)
    return rows


def _explainable(manifest: Manifest, inputs: list[Tensor]) -> tuple[np.ndarray, int, TensorSpec]:
    """The one input row, its features and the scores output to attribute, when ``manifest``'s
    model can be explained by finite differences over a batch; else ``InvalidInput`` saying why."""
    spec = manifest.inputs[0]
    if len(manifest.inputs) != 1 or spec.datatype not in FLOATS:
        raise InvalidInput(f"explanations need a model with one floating-point input; {manifest.name} takes "
                           f"{', '.join(f'{s.name} ({s.datatype})' for s in manifest.inputs)}")
    if not spec.shape or spec.shape[0] != -1:
        raise InvalidInput(f"explanations run the model on a batch of evaluations: they need an input whose "
                           f"first dimension is the batch, left open (-1); {manifest.name} declares "
                           f"{list(spec.shape)}")
    scores = manifest.scores
    if scores is None:
        answers = ", ".join(o.described for o in manifest.outputs)
        raise InvalidInput(f"explanations attribute a floating-point scores output of shape [-1, classes] "
                           f"(probabilities or logits); {manifest.name} answers {answers}")
    x = inputs[0].array
    if x.shape[0] != 1:
        raise InvalidInput(f"an explanation is for one input row: send shape [1, ...], not {list(x.shape)}")
    features = int(x[0].size)
    if not features:
        raise InvalidInput(f"an explanation attributes a prediction to its input's features; this input "
                           f"has none (shape {list(x.shape)})")
    if features > MAX_FEATURES:
        raise InvalidInput(f"{manifest.name} takes {features} features per row; explanations by finite "
                           f"differences are limited to {MAX_FEATURES}")
    return x, features, scores


class Explain:
    """Integrated-gradients attributions for the one checked input row, into the answer."""

    name = "explain"

    def __init__(self, pool: WorkerPool, limiter: Limiter) -> None:
        self.pool = pool
        self.limiter = limiter

    async def __call__(self, call: InferCall) -> None:
        assert call.request is not None
        manifest = call.model.manifest
        spec = manifest.inputs[0]
        x, features, scores_spec = _explainable(manifest, call.inputs)
        lo = spec.min if spec.min is not None else 0.0
        span = (spec.max - lo) if spec.max is not None else 1.0
        flat = x.reshape(-1).astype(np.float64)
        baseline = np.full_like(flat, lo)
        h = STEP_FRACTION * span
        evaluations = 2 * STEPS * features + 2
        key = f"{principal_of(call.ctx).key}|{call.model.unit.model}"
        limiter = self.limiter
        await limiter.admit(call.ctx.take_charges(Charge(limiter.per_principal_explain, key),
                                                  Charge(limiter.budget_inferences, key, evaluations),
                                                  Charge(limiter.budget_rows, key, evaluations)))
        call.ctx.inputs = [tensor_digest(call.inputs[0])]  # the record: what was explained, where
        ends = await self._scores(call, scores_spec, np.stack([flat, baseline]), x)  # f(x) and f(b), every class
        target = int(np.argmax(ends[0]))
        alphas = (np.arange(STEPS) + 0.5) / STEPS
        points = baseline + alphas[:, None] * (flat - baseline)  # (STEPS, features)
        around = (await self._along_path(call, scores_spec, points, h, target, x)).reshape(STEPS, 2, features)
        gradients = (around[:, 0, :] - around[:, 1, :]) / (2 * h)
        attributions = (flat - baseline) * gradients.mean(axis=0)
        prediction, baseline_prediction = float(ends[0, target]), float(ends[1, target])
        body = {
            "model_name": manifest.name, "model_version": manifest.version, "id": call.request.id,
            "method": "integrated_gradients", "target": target, "steps": STEPS, "evaluations": evaluations,
            "baseline": float(lo), "prediction": prediction, "baseline_prediction": baseline_prediction,
            "completeness_delta": float(attributions.sum() - (prediction - baseline_prediction)),
            "attributions": [{"name": spec.name, "datatype": "FP32", "shape": list(x.shape),
                              "data": attributions.astype(np.float32).tolist()}],
        }
        call.answer = Answer(orjson.dumps({k: v for k, v in body.items() if v is not None}), "application/json")

    async def _along_path(self, call: InferCall, scores_spec: TensorSpec, points: np.ndarray, h: float,
                          target: int, x: np.ndarray) -> np.ndarray:
        """The ``target`` score of every evaluation along the path, a batch of ``BATCH_BYTES`` at a time."""
        features = points.shape[1]
        per_batch = max(1, BATCH_BYTES // (features * x.dtype.itemsize))
        f = np.empty(2 * len(points) * features)
        for start in range(0, len(f), per_batch):
            stop = min(start + per_batch, len(f))
            rows = await offload((stop - start) * features, path_rows, points, h, start, stop)
            f[start:stop] = (await self._scores(call, scores_spec, rows, x))[:, target]
        return f

    async def _scores(self, call: InferCall, scores_spec: TensorSpec, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The model's scores for ``rows`` (flat evaluations of the input), one row of classes each."""
        manifest = call.model.manifest

        def picked(worker: str) -> None:
            call.ctx.worker = worker

        shaped = rows.reshape(len(rows), *x.shape[1:]).astype(x.dtype, copy=False)
        outputs = await self.pool.infer(call.model.unit.key, [Tensor(manifest.inputs[0].name, shaped)],
                                        call.ctx.deadline, picked, answer_bound(manifest, len(rows)))
        check_answer(manifest, outputs, len(rows))
        answer = next((t.array for t in outputs if t.name == scores_spec.name), None)
        if answer is None or answer.ndim != 2 or answer.shape[0] != len(rows):  # not the declared [-1, classes]
            got = "nothing" if answer is None else list(answer.shape)
            raise InvalidInput(f"{manifest.name} answered {got} for {len(rows)} evaluations: its "
                               f"{scores_spec.name} does not give one row of scores per row")
        return np.asarray(answer, np.float64)
