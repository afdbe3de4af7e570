"""Pure-ASGI middleware, one per file, outer to inner: problems, context, address limits, auth,
principal limits (the audit middleware, outermost, lives in ``gateway.audit``)."""

from gateway.middleware.auth import AuthMiddleware
from gateway.middleware.context import ContextMiddleware
from gateway.middleware.problems import ProblemMiddleware, ProblemResponse, send_problem

__all__ = ["AuthMiddleware", "ContextMiddleware", "ProblemMiddleware", "ProblemResponse", "send_problem"]
