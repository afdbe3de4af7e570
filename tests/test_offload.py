"""What leaves the event loop: BYTES elements weigh more than numbers, and large work runs in a thread."""

from __future__ import annotations

import threading

import anyio
import numpy as np

from gateway.offload import OFFLOAD_ELEMENTS, TEXT_WEIGHT, elements, offload, text_elements
from gateway_client.protocol.codec import Tensor


def test_a_bytes_element_weighs_more_than_a_number() -> None:
    numbers = Tensor("x", np.zeros((4, 10), np.float32))
    text = Tensor("t", np.array([b"a", b"b", b"c"], dtype=object))
    assert elements([numbers]) == 40 and text_elements([numbers]) == 0
    assert elements([numbers, text]) == 40 + 3 * TEXT_WEIGHT and text_elements([numbers, text]) == 3 * TEXT_WEIGHT


def test_work_over_the_threshold_runs_in_a_thread() -> None:
    async def where(work: int) -> int:
        return await offload(work, threading.get_ident)

    async def main() -> tuple[int, int, int]:
        return threading.get_ident(), await where(OFFLOAD_ELEMENTS), await where(OFFLOAD_ELEMENTS + 1)

    loop, small, large = anyio.run(main)
    assert small == loop and large != loop
    text = Tensor("t", np.empty(OFFLOAD_ELEMENTS // TEXT_WEIGHT + 1, dtype=object))
    assert text_elements([text]) > OFFLOAD_ELEMENTS  # 16,385 strings leave the loop, as 1 Mi numbers would
