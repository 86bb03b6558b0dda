"""The order in which waiting requests are released: priority classes, then fair shares.

Wherever the gateway queues (a replica slot under `max_concurrency`, a cold start), the next
request to go is chosen here:

1. **Priority classes**, strictly: `interactive` before `standard` before `batch`, with a
   starvation guard: a class whose oldest request has waited `starvation_s` goes next, so
   batch work still moves under a steady interactive load.
2. **Within a class, the Virtual Token Counter** (Sheng et al., "Fairness in Serving Large
   Language Models", OSDI 2024): every tenant has a counter of the service it received,
   divided by its weight; the backlogged tenant with the smallest counter goes next. Service
   is tokens: input tokens when a request is released (`release`), output tokens as they
   stream (`charge`). A tenant that returns from idle is lifted to the smallest counter of
   those backlogged, so it cannot bank credit while away (the paper's counter lift). When no
   other tenant waits in its class, it is lifted to the highest counter of all: this queue
   fills only while the fleet is saturated and counters live as long as the process, so the
   first tenant to wait in a new spell of saturation would otherwise be owed all that the
   others were served in earlier spells, and go first until it caught up. Every spell
   starts level.

Pure: no clock reads (`now` comes in), no I/O. Fairness is per gateway process.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Hashable)

DEFAULT_STARVATION_S = 30.0


class Priority(enum.IntEnum):
    """Lower values go first."""

    INTERACTIVE = 0
    STANDARD = 1
    BATCH = 2


@dataclass(slots=True)
class _Waiting(Generic[T]):
    item: T
    tenant: str
    since: float
    order: int
    input_tokens: int


@dataclass(slots=True)
class _Tenant:
    weight: float
    counter: float = 0.0  # service received / weight, in tokens
    queues: dict[Priority, deque[_Waiting[Any]]] = field(default_factory=dict)

    def backlogged(self, priority: Priority) -> bool:
        queue = self.queues.get(priority)
        return bool(queue)


class FairQueue(Generic[T]):
    """Waiting requests of any number of tenants; `release` says which goes next."""

    def __init__(self, starvation_s: float = DEFAULT_STARVATION_S) -> None:
        if starvation_s <= 0:
            raise ValueError(f"starvation_s must be > 0, not {starvation_s}")
        self.starvation_s = starvation_s
        self._tenants: dict[str, _Tenant] = {}
        self._where: dict[T, tuple[_Waiting[T], Priority]] = {}
        self._order = itertools.count()
        self._top = 0.0  # the highest counter of any tenant (counters never go down)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, item: object) -> bool:
        return item in self._where

    def counter(self, tenant: str) -> float:
        """The tenant's virtual counter (tokens served / weight)."""
        known = self._tenants.get(tenant)
        return 0.0 if known is None else known.counter

    def push(
        self,
        item: T,
        tenant: str,
        *,
        now: float,
        weight: float = 1.0,
        priority: Priority = Priority.STANDARD,
        input_tokens: int = 0,
    ) -> None:
        """`item` waits; `input_tokens` are charged when it is released."""
        if item in self._where:
            raise ValueError("the item is already waiting")
        if weight <= 0:
            raise ValueError(f"weight must be > 0, not {weight}")
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(weight)
        state.weight = weight
        if not state.backlogged(priority):
            # Counter lift: back from idle, it starts level with the least-served of those
            # waiting in its class, not below them with credit saved while away.
            # Into an empty class: level with the most-served, as a new spell starts.
            floor = self._min_counter(priority, exclude=tenant)
            state.counter = max(state.counter, self._top if floor is None else floor)
        waiting = _Waiting(item, tenant, now, next(self._order), input_tokens)
        state.queues.setdefault(priority, deque()).append(waiting)
        self._where[item] = (waiting, priority)

    def remove(self, item: T) -> bool:
        """Take a waiting item out (its client left); False if it was not waiting."""
        found = self._where.pop(item, None)
        if found is None:
            return False
        waiting, priority = found
        queue = self._tenants[waiting.tenant].queues[priority]
        queue.remove(waiting)
        return True

    def release(self, now: float) -> T | None:
        """The next item to go (its input tokens charged to its tenant), or None if empty."""
        priority = self._next_class(now)
        if priority is None:
            return None
        tenant_name, state = min(
            ((n, t) for n, t in self._tenants.items() if t.backlogged(priority)),
            key=lambda nt: (nt[1].counter, self._head(nt[1], priority).order),
        )
        queue = state.queues[priority]
        waiting: _Waiting[T] = queue.popleft()
        del self._where[waiting.item]
        self.charge(tenant_name, waiting.input_tokens)
        return waiting.item

    def next_priority(self, now: float) -> Priority | None:
        """The class `release(now)` would take from, or None if nothing waits."""
        return self._next_class(now)

    def charge(self, tenant: str, tokens: int) -> None:
        """Count `tokens` of service to `tenant` (output tokens as they stream)."""
        state = self._tenants.get(tenant)
        if state is not None and tokens > 0:
            state.counter += tokens / state.weight
            self._top = max(self._top, state.counter)

    # -- internals ----------------------------------------------------------------------
    def _next_class(self, now: float) -> Priority | None:
        """The highest waiting class, unless a lower one's oldest has starved."""
        heads: dict[Priority, float] = {}
        for state in self._tenants.values():
            for priority, queue in state.queues.items():
                if queue:
                    since = queue[0].since
                    heads[priority] = min(heads.get(priority, since), since)
        if not heads:
            return None
        starved = [p for p, since in heads.items() if now - since >= self.starvation_s]
        if starved:
            return min(starved, key=lambda p: heads[p])  # the longest starved first
        return min(heads)

    def _min_counter(self, priority: Priority, exclude: str) -> float | None:
        counters = [
            t.counter
            for name, t in self._tenants.items()
            if name != exclude and t.backlogged(priority)
        ]
        return min(counters) if counters else None

    @staticmethod
    def _head(state: _Tenant, priority: Priority) -> _Waiting[Any]:
        return state.queues[priority][0]
