"""Usage sinks for tests of the ledger: an in-memory one, and a wrapper that fails on demand.

`MemoryUsageSink` keeps rows by request id and, like the SQL store, skips ids it already has
(INSERT ... ON CONFLICT DO NOTHING). `FlakySink` wraps any sink (the memory one, or the real
store on SQLite) and can be told to fail: `down()` until `up()` (every call raises
ConnectionRefusedError, as a driver does when nothing listens), `hang()` until `up()` (calls
never answer, as behind a network partition), `fail_next(n)`, and `lose_acks(n)` (the write
lands but the answer is lost: the caller sees an error, and its retry must not double rows).
`FakeUsageSink` is the two together. `usage_row` makes a row; `run_inline` is the ledger's
offload on a FakeClock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

from fleetserve.tenancy.ledger import UsageSink
from fleetserve.tenancy.model import FinishReason, UsageRow

_T = TypeVar("_T")


def usage_row(request_id: str, *, tenant: str = "team-a", n: int = 0) -> UsageRow:
    """A plausible ledger row (its numbers vary with `n`)."""
    started = 1_700_000_000.0 + n * 0.001
    return UsageRow(
        request_id=request_id,
        tenant=tenant,
        key_prefix="Ab3dEf9h",
        model="llama-3-8b",
        replica="r1",
        status=200,
        prompt_tokens=12 + n % 100,
        completion_tokens=30 + n % 7,
        cost_micro_usd=7 * n,
        queue_s=0.001,
        ttft_s=0.05,
        e2e_s=0.4,
        started_at=started,
        ended_at=started + 0.4,
        finish_reason=FinishReason.STOP,
    )


class MemoryUsageSink:
    """In memory, idempotent on request_id; `calls` holds each insert's batch size."""

    def __init__(self) -> None:
        self.rows: dict[str, UsageRow] = {}
        self.calls: list[int] = []

    async def insert_usage(self, rows: Sequence[UsageRow]) -> int:
        self.calls.append(len(rows))
        inserted = 0
        for row in rows:
            if row.request_id not in self.rows:
                self.rows[row.request_id] = row
                inserted += 1
        return inserted


class FlakySink:
    """A sink that fails when told to (see the module docstring); `failures` counts them."""

    def __init__(self, inner: UsageSink) -> None:
        self.inner = inner
        self.failures = 0
        self._down = False
        self._hanging = False
        self._fail_next = 0
        self._lose_acks = 0
        self._released = asyncio.Event()

    @property
    def is_down(self) -> bool:
        return self._down or self._hanging

    def down(self) -> None:
        self._down = True

    def hang(self) -> None:
        self._hanging = True
        self._released.clear()

    def up(self) -> None:
        self._down = False
        self._hanging = False
        self._released.set()

    def fail_next(self, calls: int) -> None:
        self._fail_next = calls

    def lose_acks(self, calls: int) -> None:
        self._lose_acks = calls

    async def insert_usage(self, rows: Sequence[UsageRow]) -> int:
        if self._hanging:
            await self._released.wait()
            self.failures += 1
            raise ConnectionResetError("the usage sink's connection was lost")
        if self._down or self._fail_next > 0:
            self._fail_next = max(self._fail_next - 1, 0)
            self.failures += 1
            raise ConnectionRefusedError("the usage sink is down")
        inserted = await self.inner.insert_usage(rows)
        if self._lose_acks > 0:
            self._lose_acks -= 1
            self.failures += 1
            raise ConnectionResetError("the usage sink's answer was lost")
        return inserted


class FakeUsageSink(FlakySink):
    """In memory and failing on demand: `rows` and `calls` are the memory sink's."""

    def __init__(self) -> None:
        self.memory = MemoryUsageSink()
        super().__init__(self.memory)

    @property
    def rows(self) -> dict[str, UsageRow]:
        return self.memory.rows

    @property
    def calls(self) -> list[int]:
        return self.memory.calls


async def run_inline(fn: Callable[[], _T], /) -> _T:
    """An `Offload` that does blocking work on the event loop: for tests on a FakeClock,
    where a worker thread would finish in real time, not virtual time."""
    return fn()
