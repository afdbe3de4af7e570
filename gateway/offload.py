"""Work over tensors that leaves the event loop when it is large: checks, digests, encodings.

A numeric element costs a share of one vectorized pass; a BYTES element a Python-level step each
(a length, a copy, a UTF-8 check), so it counts ``TEXT_WEIGHT`` times. Work over more than
``OFFLOAD_ELEMENTS`` runs in a thread: a Python loop there still holds the interpreter's lock,
but hands it back every switch interval (5 ms), so other requests go on meanwhile. Measured on the
two-core machine, 780,000 BYTES elements held the event loop for 0.2 s to encode for a worker and
0.35 s to decode its answer, and a concurrent request waited 393 ms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread

from gateway_client.protocol.codec import Tensor

__all__ = ["OFFLOAD_ELEMENTS", "TEXT_WEIGHT", "elements", "offload", "text_elements"]

T = TypeVar("T")

OFFLOAD_ELEMENTS = 1 << 20
"""Work over more tensor elements than this (a sum, a check, a digest) leaves the event loop."""
TEXT_WEIGHT = 64
"""What a BYTES element counts for, against a numeric one."""


def elements(tensors: list[Tensor]) -> int:
    """The tensors' elements, each BYTES one counted ``TEXT_WEIGHT`` times."""
    count = 0
    for t in tensors:
        count += t.array.size * (TEXT_WEIGHT if t.array.dtype == object else 1)
    return count


def text_elements(tensors: list[Tensor]) -> int:
    """The tensors' BYTES elements, each counted ``TEXT_WEIGHT`` times: what encoding them costs
    (numeric tensors are encoded as views of their memory, whatever their size)."""
    return sum(t.array.size for t in tensors if t.array.dtype == object) * TEXT_WEIGHT


async def offload(elements: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` here when it is small, else in a thread, so the event loop stays free."""
    if elements <= OFFLOAD_ELEMENTS:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)
