"""Pure-ASGI middleware, one per file, outer to inner: problems, context."""

from gateway.middleware.context import ContextMiddleware
from gateway.middleware.problems import ProblemMiddleware, problem_response

__all__ = ["ContextMiddleware", "ProblemMiddleware", "problem_response"]
