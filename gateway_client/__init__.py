"""The gateway's Python SDK: tokens, mTLS, retries and typed errors over the Open Inference Protocol.

    import numpy as np
    from gateway_client import Client

    with Client.from_credentials("credentials.json", principal="demo") as client:
        out = client.infer("digits", np.full((1, 64), 8, np.float32))
        print(out["probabilities"].argmax())

Imports neither the server (Starlette, uvicorn) nor onnxruntime: only httpx, authlib, numpy and
the protocol codec.
"""

from gateway_client.auth import CallableToken, ClientCredentials, StaticToken, TokenSource
from gateway_client.core import AsyncClient, Client, InferResult, RetryPolicy, ssl_context
from gateway_client.errors import (
    AdversarialInputRefused,
    AuthenticationError,
    BudgetExhausted,
    ClientError,
    ConnectionFailed,
    Forbidden,
    GatewayError,
    InvalidInput,
    NotFound,
    RateLimited,
    StepUpRequired,
    Timeout,
    Unavailable,
)

__all__ = [
    "AdversarialInputRefused", "AsyncClient", "AuthenticationError", "BudgetExhausted", "CallableToken", "Client", "ClientCredentials",
    "ClientError", "ConnectionFailed", "Forbidden", "GatewayError", "InferResult", "InvalidInput", "NotFound", "RateLimited",
    "RetryPolicy", "StaticToken", "StepUpRequired", "Timeout", "TokenSource", "Unavailable", "ssl_context",
]
