"""The model-aware request path: an ordered list of stages over one ``InferCall``.

Middleware handles what needs no model (errors, context, address limits, authentication, audit);
everything that needs the model, the decision or the tensors is a stage. The list is assembled in
``gateway.app.infer_stages``, next to the middleware list:

    Resolve → ReadBody → Decode → CheckSignature → [guards] → ModelLimits → Infer → [verdicts]
        → [output policies] → Encode

Guards (the AI-specific monitors: adversarial inputs, anomalies, extraction) and output policies
(top-k, rounding, label-only) take their positions in that list. A stage reads and writes its part
of the call and of the request context, or raises a ``GatewayError`` to refuse; see
``docs/architecture.md``.
"""

from gateway.stages.base import Answer, InferCall, Stage, offload, run_stages
from gateway.stages.body import InFlightBytes, ReadBody, read_body
from gateway.stages.checks import CheckSignature, ModelLimits
from gateway.stages.decode import Decode, Decoder
from gateway.stages.infer import Encode, Infer, tensor_digest
from gateway.stages.resolve import Resolve, resolve_model

__all__ = [
    "Answer", "CheckSignature", "Decode", "Decoder", "Encode", "InFlightBytes", "Infer", "InferCall", "ModelLimits",
    "ReadBody", "Resolve", "Stage", "offload", "read_body", "resolve_model", "run_stages", "tensor_digest",
]
