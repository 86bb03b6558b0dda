"""The bench runner on a FakeClock with a fake sender: exact send times, bounds, the drain."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from fleetserve.bench.patterns import parse_pattern
from fleetserve.bench.records import RequestRecord
from fleetserve.bench.runner import (
    Progress,
    RunLimits,
    RunResult,
    Sender,
    run_closed_loop,
    run_open_loop,
)
from fleetserve.bench.schedule import ClosedLoop
from fleetserve.bench.workload import BuiltRequest
from fleetserve.errors import ConfigError
from fleetserve.testing.clock import DEFAULT_WALL_START, FakeClock

REQUEST = BuiltRequest("/v1/chat/completions", b"{}", stream=True, output_tokens=4, group="g1")
MAX_STEPS = 100_000


class FakeSender:
    """Answers after `service_s` of (fake) time; remembers how many were in flight at once."""

    def __init__(self, clock: FakeClock, t0: float, service_s: float, crash_at: int = -1) -> None:
        self.clock, self.t0, self.service_s, self.crash_at = clock, t0, service_s, crash_at
        self.in_flight = 0
        self.peaks: list[tuple[float, int]] = []  # (time, in flight) at each send
        self.closed = False

    async def send(self, request: BuiltRequest, record: RequestRecord) -> None:
        record.sent_s = self.clock.now() - self.t0
        if record.index == self.crash_at:
            raise RuntimeError("a bug")
        self.in_flight += 1
        self.peaks.append((record.sent_s, self.in_flight))
        try:
            await self.clock.sleep(self.service_s)
            record.end_s = self.clock.now() - self.t0
            record.first_token_s = record.end_s
            record.status = 200
        except asyncio.CancelledError:
            record.error_kind, record.end_s = "cancelled", self.clock.now() - self.t0
            raise
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        self.closed = True


async def drive(clock: FakeClock, run: Coroutine[Any, Any, RunResult]) -> RunResult:
    """Run `run` while moving fake time forward in small steps (bounded)."""
    task = asyncio.ensure_future(run)
    for _ in range(MAX_STEPS):
        if task.done():
            return task.result()
        await clock.advance(0.05)
    task.cancel()
    raise AssertionError("the run did not finish")


def senders_list() -> list[FakeSender]:
    return []


def connect_with(
    clock: FakeClock, service_s: float, senders: list[FakeSender], crash_at: int = -1
) -> Callable[[float], Sender]:
    def connect(t0: float) -> Sender:
        sender = FakeSender(clock, t0, service_s, crash_at)
        senders.append(sender)
        return sender

    return connect


async def test_open_loop_sends_at_intended_times_without_waiting_for_earlier_ones() -> None:
    clock, senders = FakeClock(start=100.0), senders_list()
    offsets = [0.0, 0.25, 0.5, 1.0, 1.0, 2.5]
    result = await drive(clock, run_open_loop(
        offsets, lambda i: REQUEST, clock=clock, connect=connect_with(clock, 2.0, senders),
        limits=RunLimits(duration_s=3.0),
    ))  # fmt: skip
    records = result.records
    assert [r.index for r in records] == list(range(6))
    assert [r.intended_s for r in records] == offsets
    assert [r.sent_s for r in records] == offsets  # fake time: zero lag
    assert [r.end_s for r in records] == [t + 2.0 for t in offsets]
    assert all(r.ok and r.group == "g1" for r in records)
    assert max(n for _, n in senders[0].peaks) == 5  # answers take 2 s: they overlap
    assert (result.mode, result.scheduled, result.skipped, result.cancelled) == ("open", 6, 0, 0)
    assert result.started_wall_s == DEFAULT_WALL_START  # the fake clock's wall time at 100.0
    assert result.duration_s == 4.5  # the last answer
    assert senders[0].closed


@pytest.mark.parametrize(
    ("limits", "sent"),
    [
        pytest.param(RunLimits(duration_s=1.0), 4, id="duration-bounds"),
        pytest.param(RunLimits(duration_s=9.0, max_requests=3), 3, id="count-bounds"),
    ],
)
async def test_open_loop_bounds(limits: RunLimits, sent: int) -> None:
    clock, senders = FakeClock(), senders_list()
    result = await drive(clock, run_open_loop(
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.25], lambda i: REQUEST, clock=clock,
        connect=connect_with(clock, 0.1, senders), limits=limits,
    ))  # fmt: skip
    assert len(result.records) == result.scheduled == sent
    assert all(r.ok for r in result.records)


async def test_the_in_flight_cap_records_skipped_requests_as_cancelled() -> None:
    clock, senders = FakeClock(), senders_list()
    result = await drive(clock, run_open_loop(
        [0.0, 0.1, 0.2, 0.3], lambda i: REQUEST, clock=clock,
        connect=connect_with(clock, 0.25, senders),
        limits=RunLimits(duration_s=1.0, max_in_flight=2),
    ))  # fmt: skip
    kinds = [r.error_kind for r in result.records]
    assert kinds == [None, None, "cancelled", None]  # at 0.2 two are in flight; at 0.3 one
    skipped = result.records[2]
    assert skipped.error is not None
    assert skipped.error.startswith("skipped")
    assert (skipped.sent_s, skipped.end_s) == (0.2, 0.2)
    assert (result.skipped, result.cancelled) == (1, 1)


async def test_requests_still_in_flight_after_the_drain_are_cancelled_not_lost() -> None:
    clock, senders = FakeClock(), senders_list()
    result = await drive(clock, run_open_loop(
        [0.0, 0.5, 1.5], lambda i: REQUEST, clock=clock, connect=connect_with(clock, 2.0, senders),
        limits=RunLimits(duration_s=2.0, drain_s=1.0),
    ))  # fmt: skip
    # The one sent at 0.5 ends at 2.5, within the drain; the last would end at 3.5.
    assert [r.error_kind for r in result.records] == [None, None, "cancelled"]
    assert [r.end_s for r in result.records] == [2.0, 2.5, 3.0]  # the drain ends at 2 + 1
    assert result.cancelled == 1
    assert result.duration_s == 3.0


async def test_a_sender_that_crashes_gives_an_error_record_not_a_traceback() -> None:
    clock, senders = FakeClock(), senders_list()
    result = await drive(clock, run_open_loop(
        [0.0, 0.1], lambda i: REQUEST, clock=clock,
        connect=connect_with(clock, 0.1, senders, crash_at=1), limits=RunLimits(duration_s=1.0),
    ))  # fmt: skip
    crashed = result.records[1]
    assert crashed.error_kind == "protocol"
    assert crashed.error is not None
    assert "a bug" in crashed.error
    assert not math.isnan(crashed.end_s)


async def test_progress_every_interval_with_live_counters() -> None:
    clock, senders = FakeClock(), senders_list()
    seen: list[Progress] = []
    offsets = [0.05 + i * 0.1 for i in range(29)]  # 10 req/s, each answered in 0.5 s
    await drive(clock, run_open_loop(
        offsets, lambda i: REQUEST, clock=clock, connect=connect_with(clock, 0.5, senders),
        limits=RunLimits(duration_s=3.0), on_progress=seen.append,
    ))  # fmt: skip
    first = seen[0]
    assert isinstance(first, Progress)
    assert first.t_s == 1.0
    # By t=1: sent at 0.05..0.95 (10); done those sent up to 0.45 (5); 5 in flight.
    assert (first.sent, first.done, first.ok, first.errors, first.in_flight) == (10, 5, 5, 0, 5)
    assert first.rate_rps == 5.0
    assert seen[1].rate_rps == 10.0
    assert first.lag_p99_s == 0.0
    assert [p.t_s for p in seen[:3]] == [1.0, 2.0, 3.0]


async def test_closed_loop_users_send_wait_think_and_stop_at_the_duration() -> None:
    clock, senders = FakeClock(), senders_list()
    result = await drive(clock, run_closed_loop(
        ClosedLoop(users=3, think_time_s=0.5), lambda i: REQUEST, clock=clock,
        connect=connect_with(clock, 1.0, senders), limits=RunLimits(duration_s=4.0),
    ))  # fmt: skip
    # Each user sends at 0, 1.5 and 3.0 (1 s answer + 0.5 s think); 4.5 is past the end.
    assert sorted(r.sent_s for r in result.records) == [0.0] * 3 + [1.5] * 3 + [3.0] * 3
    assert all(r.ok and r.intended_s == r.sent_s for r in result.records)
    assert [r.index for r in result.records] == list(range(9))
    assert (result.mode, result.scheduled, result.cancelled) == ("closed", 9, 0)


async def test_closed_loop_users_follow_a_spike_pattern() -> None:
    clock, senders = FakeClock(), senders_list()
    spike = parse_pattern("spike:base=2,peak=5,at=2,for=2")
    result = await drive(clock, run_closed_loop(
        ClosedLoop(users=40, pattern=spike), lambda i: REQUEST, clock=clock,
        connect=connect_with(clock, 0.5, senders), limits=RunLimits(duration_s=6.0),
    ))  # fmt: skip
    peaks = senders[0].peaks

    def most(lo: float, hi: float) -> int:
        return max(n for t, n in peaks if lo <= t < hi)

    assert most(0.0, 2.0) == 2
    assert most(2.2, 4.0) == 5  # new users start within one tick of the spike
    assert most(4.5, 6.0) == 2  # users above the count stop after their request
    assert all(r.ok for r in result.records)


async def test_closed_loop_count_bound_and_cancel_at_the_end() -> None:
    clock, senders = FakeClock(), senders_list()
    result = await drive(clock, run_closed_loop(
        ClosedLoop(users=2), lambda i: REQUEST, clock=clock,
        connect=connect_with(clock, 10.0, senders),
        limits=RunLimits(duration_s=1.0, drain_s=0.5, max_requests=5),
    ))  # fmt: skip
    assert [r.error_kind for r in result.records] == ["cancelled", "cancelled"]
    assert [r.end_s for r in result.records] == [1.5, 1.5]


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"duration_s": 0.0}, id="zero-duration"),
        pytest.param({"duration_s": 1.0, "drain_s": -1.0}, id="negative-drain"),
        pytest.param({"duration_s": 1.0, "max_in_flight": 0}, id="no-in-flight"),
        pytest.param({"duration_s": math.inf}, id="endless"),
    ],
)
def test_limits_are_checked(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RunLimits(**kwargs)  # type: ignore[arg-type]


async def test_closed_loop_stops_at_the_request_count() -> None:
    clock, senders = FakeClock(), senders_list()
    result = await drive(clock, run_closed_loop(
        ClosedLoop(users=2), lambda i: REQUEST, clock=clock,
        connect=connect_with(clock, 0.1, senders),
        limits=RunLimits(duration_s=10.0, max_requests=5),
    ))  # fmt: skip
    assert len(result.records) == 5
    assert all(r.ok for r in result.records)
    assert result.duration_s < 1.0
