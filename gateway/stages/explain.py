"""Explanations: per-feature attributions for one input, by integrated gradients.

Integrated gradients (Sundararajan et al., 2017) from the baseline ``b`` (the input domain's
minimum, a blank input) to the input ``x``: attribution_i = (x_i − b_i) · mean over the path of
∂f/∂x_i, where ``f`` is the score of the class the model predicts for ``x``. The gradients are estimated model-agnostically by central
finite differences at ``STEPS`` midpoints of the path: all 2·STEPS·features + 2 evaluations go to
the worker as one batch, not one round trip per feature. By completeness the attributions add up
to f(x) − f(b); the answer reports the difference (``completeness_delta``).

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
from gateway.registry.signature import check_answer
from gateway.security.ratelimit import Charge, Limiter
from gateway.stages.base import Answer, InferCall, offload
from gateway.stages.infer import tensor_digest
from gateway.workers.pool import WorkerPool
from gateway_client.protocol.codec import Tensor
from gateway_client.protocol.datatypes import FLOATS

__all__ = ["MAX_FEATURES", "STEPS", "Explain"]

STEPS = 16
MAX_FEATURES = 4096
"""Finite differences cost two evaluations per feature and step: 4,096 features are 131,074 rows."""
STEP_FRACTION = 0.01
"""The finite-difference step, as a share of the input domain's span."""


def _path_batch(x: np.ndarray, baseline: np.ndarray, h: float) -> np.ndarray:
    """x, the baseline, then for each midpoint of the path each feature nudged up and down by h."""
    d = x.size
    alphas = (np.arange(STEPS) + 0.5) / STEPS
    points = baseline + alphas[:, None] * (x - baseline)  # (STEPS, d)
    nudges = np.concatenate([np.eye(d), -np.eye(d)]) * h  # (2d, d)
    around = (points[:, None, :] + nudges[None, :, :]).reshape(-1, d)
    return np.asarray(np.concatenate([x[None], baseline[None], around]), dtype=np.float32)


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
        batch = await offload(2 * STEPS * features * features, _path_batch, flat, baseline, h)
        evaluations = len(batch)
        key = f"{principal_of(call.ctx).key}|{call.model.unit.model}"
        limiter = self.limiter
        await limiter.admit(call.ctx.take_charges(Charge(limiter.per_principal_explain, key),
                                                  Charge(limiter.budget_inferences, key, evaluations),
                                                  Charge(limiter.budget_rows, key, evaluations)))
        shaped = batch.reshape(evaluations, *x.shape[1:]).astype(x.dtype, copy=False)
        call.ctx.inputs = [tensor_digest(call.inputs[0])]  # the record: what was explained, where

        def picked(worker: str) -> None:
            call.ctx.worker = worker

        outputs = await self.pool.infer(call.model.unit.key, [Tensor(spec.name, shaped)], call.ctx.deadline, picked)
        check_answer(manifest, outputs)
        answer = next((t.array for t in outputs if t.name == scores_spec.name), None)
        if answer is None or answer.ndim != 2 or answer.shape[0] != evaluations:  # not the declared [-1, classes]
            got = "nothing" if answer is None else list(answer.shape)
            raise InvalidInput(f"{manifest.name} answered {got} for {evaluations} evaluations: its "
                               f"{scores_spec.name} does not give one row of scores per row")
        scores = answer.reshape(evaluations, -1).astype(np.float64)
        target = int(np.argmax(scores[0]))
        f = scores[:, target]
        around = f[2:].reshape(STEPS, 2, features)
        gradients = (around[:, 0, :] - around[:, 1, :]) / (2 * h)
        attributions = (flat - baseline) * gradients.mean(axis=0)
        body = {
            "model_name": manifest.name, "model_version": manifest.version, "id": call.request.id,
            "method": "integrated_gradients", "target": target, "steps": STEPS, "evaluations": evaluations,
            "baseline": float(lo), "prediction": float(f[0]), "baseline_prediction": float(f[1]),
            "completeness_delta": float(attributions.sum() - (f[0] - f[1])),
            "attributions": [{"name": spec.name, "datatype": "FP32", "shape": list(x.shape),
                              "data": attributions.astype(np.float32).tolist()}],
        }
        call.answer = Answer(orjson.dumps({k: v for k, v in body.items() if v is not None}), "application/json")
