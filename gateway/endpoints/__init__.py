"""The HTTP handlers, by owner in the route table (``gateway.routes``): the Open Inference Protocol
(``V2``), the built-in issuer (``IssuerEndpoints``), and the operators' endpoints (``OpsEndpoints``)."""

from gateway.endpoints.issuer import IssuerEndpoints
from gateway.endpoints.ops import OpsEndpoints
from gateway.endpoints.v2 import V2

__all__ = ["IssuerEndpoints", "OpsEndpoints", "V2"]
