"""What a caller may see of the model's answer: the output policy of the model and the caller's roles.

Applied to score outputs, the two-dimensional floating-point ones (probabilities or logits, one
row per input row); other outputs pass unchanged. Shapes and datatypes stay as declared, so
clients (``tritonclient``, the SDK) need no change:

* ``full``: as the model answered;
* ``round``: rounded to ``decimals``;
* ``top_k``: the ``top_k`` largest scores of each row kept, the others answered as 0;
* ``noised``: Laplace noise of scale ``1/epsilon`` added to each score; probabilities are then
  clipped at 0 and renormalised (output perturbation, not a differential-privacy guarantee for
  the training data);
* ``label_only``: a one-hot row for the top class (its argmax is the model's, nothing else is).

Model-extraction attacks learn from the scores; label-only answers cost no accuracy and make a copy
need markedly more queries for the same fidelity. The audit record's output digests are of what
the caller received, and it names the policy.
"""

from __future__ import annotations

import numpy as np

from gateway.access import principal_of
from gateway.config import OUTPUT_POLICIES, OutputConfig
from gateway.stages.base import InferCall, elements, offload
from gateway.stages.infer import tensor_digest
from gateway_client.protocol.codec import Tensor

__all__ = ["OutputPolicy", "apply_policy", "stricter_policy"]


def _is_scores(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.dtype.kind == "f"


def _probabilities(array: np.ndarray) -> bool:
    return bool(array.size) and float(array.min()) >= 0.0 and bool(np.allclose(array.sum(axis=1), 1.0, atol=1e-3))


def apply_policy(array: np.ndarray, policy: str, settings: OutputConfig, rng: np.random.Generator) -> np.ndarray:
    """``array`` (rows × scores) as ``policy`` lets a caller see it, in its own datatype."""
    dtype = array.dtype
    if not array.size:  # no scores (a width of zero): nothing to reveal, nothing to pick a label from
        return array
    if policy == "round":
        return np.round(array, settings.decimals).astype(dtype)
    if policy == "label_only":
        out = np.zeros_like(array)
        out[np.arange(len(array)), np.argmax(array, axis=1)] = 1
        return out
    if policy == "top_k":
        k = min(settings.top_k, array.shape[1])
        keep = np.argpartition(-array, k - 1, axis=1)[:, :k]
        out = np.zeros_like(array)
        np.put_along_axis(out, keep, np.take_along_axis(array, keep, axis=1), axis=1)
        return out
    if policy == "noised":
        noised = array.astype(np.float64) + rng.laplace(0.0, 1.0 / settings.epsilon, array.shape)
        if _probabilities(array):
            noised = np.clip(noised, 0.0, None)
            total = noised.sum(axis=1, keepdims=True)
            noised = np.where(total > 0, noised / np.where(total > 0, total, 1.0), 1.0 / array.shape[1])
        return noised.astype(dtype)
    return array


def stricter_policy(policy: str, floor: str | None) -> str:
    """The less revealing of an output policy and a floor (an extraction alarm's ``label_only``)."""
    if floor is None or OUTPUT_POLICIES.index(floor) <= OUTPUT_POLICIES.index(policy):
        return policy
    return floor


class OutputPolicy:
    """The output-policy position's stage: the caller's policy applied, the digests made again."""

    name = "output-policy"

    def __init__(self, rng: np.random.Generator | None = None) -> None:
        self.rng = rng or np.random.default_rng()

    async def __call__(self, call: InferCall) -> None:
        settings = call.model.config.output
        policy = stricter_policy(settings.policy_for(principal_of(call.ctx).roles), call.policy_floor)
        if policy == "full":
            return
        call.outputs = [Tensor(t.name, apply_policy(t.array, policy, settings, self.rng)) if _is_scores(t.array) else t
                        for t in call.outputs]
        call.ctx.output_policy = policy
        call.ctx.outputs = await offload(elements(call.outputs), lambda: [tensor_digest(t) for t in call.outputs])
