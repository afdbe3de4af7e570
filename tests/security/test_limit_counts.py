"""The memory counts, hit by hit, against ``limits``' own strategies on ``limits``' own memory
storage: the same decisions for every strategy, the same clock, and waits that are true (after
the wait a hit of the same cost fits; before it, it does not)."""

from __future__ import annotations

import random
import time

import pytest
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from gateway.security.limitstores import Limit, MemoryCounts
from gateway.security.types import LimitPolicy

STRATEGIES = {"fixed-window": FixedWindowRateLimiter, "sliding-window": SlidingWindowCounterRateLimiter,
              "moving-window": MovingWindowRateLimiter}


class Clock:
    """time.time for both sides; quarter seconds against an 8-second window, so that every
    fraction either side computes is exact."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def copy(counts: MemoryCounts, strategy: str) -> MemoryCounts:
    twin = MemoryCounts(strategy)
    twin.fixed = {k: list(v) for k, v in counts.fixed.items()}
    twin.sliding = {k: list(v) for k, v in counts.sliding.items()}
    twin.moving = {k: list(v) for k, v in counts.moving.items()}
    return twin


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_memory_counts_decide_as_the_limits_strategies(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    item = parse("5/8 seconds")
    policy = LimitPolicy.parse("per-principal", "5/8 seconds", budget=strategy == "fixed-window")
    ours = MemoryCounts(strategy)
    storage = MemoryStorage()
    storage.timer.cancel()  # its expiry thread would race the clock; expired entries are skipped anyway
    storage._MemoryStorage__schedule_expiry = lambda: None  # type: ignore[attr-defined]
    theirs = STRATEGIES[strategy](storage)
    rng = random.Random(7)
    refusals = 0
    for step in range(3000):
        clock.now += rng.choice((0, 0, 0.25, 0.5, 1.0, 2.75, 6.0, 9.0))
        key, cost = rng.choice("ab"), rng.choice((1, 1, 1, 2, 3))
        # limits' fixed window counts a refused hit; test first, as the gateway's budgets do
        expected = theirs.test(item, key, cost=cost) and theirs.hit(item, key, cost=cost)
        refused = ours.admit_now([Limit(policy, policy.items[0], key, cost)])
        assert (refused is None) == expected, (step, clock.now, key, cost, refused)
        if refused is not None:
            refusals += 1
            wait = refused[1]
            assert 0 <= wait <= 16, wait  # 0: refused at the very edge of a window
            saved = clock.now
            clock.now = saved + wait - 0.01  # the wait is true: not before it (a copy of the state)...
            assert wait < 0.01 or copy(ours, strategy).admit_now([Limit(policy, policy.items[0], key, cost)]) is not None \
                or strategy == "sliding-window"  # its weight falls continuously: room may come sooner
            clock.now = saved + wait + 0.01  # ...and after it
            assert copy(ours, strategy).admit_now([Limit(policy, policy.items[0], key, cost)]) is None, (step, wait)
            clock.now = saved
    assert 300 < refusals < 2700, refusals  # both answers were exercised


def test_memory_counts_forget_what_has_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    counts = MemoryCounts("sliding-window")
    policy = LimitPolicy.parse("per-address", "3/minute")
    budget = LimitPolicy.parse("budget-rows", "10/day", budget=True)
    for n in range(1000):
        counts.admit_now([Limit(policy, policy.items[0], f"client-{n}", 1), Limit(budget, budget.items[0], f"c{n}", 1)])
    assert len(counts.sliding) == 1000 and len(counts.fixed) == 1000
    clock.now += 121  # two windows later nothing of the minute's counts can refuse anything
    counts._swept -= MemoryCounts.SWEEP_S
    counts.admit_now([])
    assert counts.sliding == {} and len(counts.fixed) == 1000  # the day's budgets still hold
    clock.now += 86_400
    counts._swept -= MemoryCounts.SWEEP_S
    counts.admit_now([])
    assert counts.fixed == {}
