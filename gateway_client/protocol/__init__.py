"""Open Inference Protocol v2 (KServe v2): datatypes, JSON and binary tensor codecs.

https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
"""

from gateway_client.protocol.codec import (
    DecodeLimits,
    InferRequest,
    RequestedOutput,
    Tensor,
    decode_infer_request,
    decode_tensor_message,
    encode_infer_response,
    encode_tensor_message,
)
from gateway_client.protocol.datatypes import DATATYPES, numpy_dtype

__all__ = [
    "DATATYPES",
    "DecodeLimits",
    "InferRequest",
    "RequestedOutput",
    "Tensor",
    "decode_infer_request",
    "decode_tensor_message",
    "encode_infer_response",
    "encode_tensor_message",
    "numpy_dtype",
]
