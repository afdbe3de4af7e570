"""Pure-ASGI middleware, one per file, outer to inner: problems, context, auth."""

from gateway.middleware.auth import AuthMiddleware
from gateway.middleware.context import ContextMiddleware
from gateway.middleware.problems import ProblemMiddleware, problem_response

__all__ = ["AuthMiddleware", "ContextMiddleware", "ProblemMiddleware", "problem_response"]
