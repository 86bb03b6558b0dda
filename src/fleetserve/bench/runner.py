"""Drive a bench run: open loop (send at intended times) or closed loop (users), bounded.

Open loop: one sender task sleeps to the next intended time and launches every request that
is due as its own task, never waiting for earlier ones; lag (sent - intended) is recorded and
latency counts from the intended time. Concurrency is bounded only by a high safety cap;
a request due while the cap is reached is recorded as `cancelled` ("skipped"), never dropped.

Closed loop: N users each send, wait for the answer, think, and send again; with a pattern
the number of active users follows it over time (`schedule.active_users`).

Several tenants at once (`run_tenants`): each `TenantLoad` is one of the two loops above with
its own sender (its own API key) and its own request bound; they share the run's clock, start,
in-flight cap, drain and records, so every record is on one timeline and carries its tenant.

Every run is bounded by a duration and a request count. At the end, requests in flight get
`drain_s` to finish and are then cancelled and recorded as `cancelled`. Every request that
was due has exactly one record in `RunResult.records`, in index order.
"""

from __future__ import annotations

import asyncio
import gc
import math
import resource
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

import uvloop

from fleetserve.bench.records import RequestRecord
from fleetserve.bench.schedule import DEFAULT_MAX_REQUESTS, ClosedLoop, active_users
from fleetserve.bench.workload import BuiltRequest
from fleetserve.clock import Clock
from fleetserve.errors import ConfigError
from fleetserve.telemetry.quantiles import percentile_of

DEFAULT_MAX_IN_FLIGHT = 10_000
LAUNCH_BATCH = 256  # requests launched before the sender lets the loop run once
USER_TICK_S = 0.1  # how often a user pattern is re-read

T = TypeVar("T")
Settled = Literal["cancelled", "protocol"]


class Sender(Protocol):
    async def send(self, request: BuiltRequest, record: RequestRecord) -> None:
        """Send `request` and fill `record` in place; raises only CancelledError."""
        ...

    async def close(self) -> None: ...


Connect = Callable[[float], Sender]  # the run's start on the clock -> a sender timing from it


@dataclass(frozen=True, slots=True)
class RunLimits:
    duration_s: float
    max_requests: int = DEFAULT_MAX_REQUESTS
    drain_s: float = 30.0  # after the duration, for requests in flight; then cancelled
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    progress_interval_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("duration_s", "progress_interval_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if not math.isfinite(self.drain_s) or self.drain_s < 0:
            raise ConfigError(f"drain_s must be a finite number >= 0, got {self.drain_s!r}")
        if self.max_requests < 1 or self.max_in_flight < 1:
            raise ConfigError("max_requests and max_in_flight must be >= 1")


@dataclass(frozen=True, slots=True)
class Progress:
    """Live counters for the console, about once per `progress_interval_s`."""

    t_s: float
    sent: int
    done: int
    ok: int
    errors: int
    in_flight: int
    rate_rps: float  # completions per second over the last interval
    lag_p99_s: float | None  # of the requests finished so far


Mode = Literal["open", "closed", "mixed"]  # mixed: tenants of both kinds in one run


@dataclass(slots=True)
class RunResult:
    """A finished run as plain data: the stats and report read it."""

    mode: Mode
    records: list[RequestRecord]
    started_wall_s: float  # Unix time of the run's start (t = 0 of every record)
    duration_s: float  # from the start to the end of the drain
    scheduled: int  # requests the schedule meant to send (open loop); sent (closed loop)
    skipped: int  # due while max_in_flight were in flight: recorded as cancelled, not sent
    cancelled: int  # every record with error_kind "cancelled", skipped ones included


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class TenantLoad:
    """One tenant's part of a run: open-loop send times (`intended_s`) or closed-loop `users`,
    its requests (`build(k)` for its k-th), and its own sender (its own API key)."""

    tenant: str | None  # on every record it sends; None for a run without tenants
    connect: Connect
    build: Callable[[int], BuiltRequest]
    intended_s: Sequence[float] | None = None
    users: ClosedLoop | None = None
    max_requests: int | None = None  # None: the run's `RunLimits.max_requests`

    def __post_init__(self) -> None:
        if (self.intended_s is None) == (self.users is None):
            raise ConfigError(f"tenant {self.tenant!r}: give send times or users, not both")
        if self.max_requests is not None and self.max_requests < 1:
            raise ConfigError(f"tenant {self.tenant!r}: max_requests must be >= 1")


class _Run:
    """The bookkeeping every loop shares: records, tasks in flight, counters, the drain."""

    def __init__(
        self, clock: Clock, limits: RunLimits, on_progress: ProgressCallback | None
    ) -> None:
        self.clock = clock
        self.limits = limits
        self.on_progress = on_progress
        self.started_wall_s = clock.wall()
        self.t0 = clock.now()
        self.records: list[RequestRecord] = []
        self.tasks: set[asyncio.Task[None]] = set()  # open-loop requests in flight
        self.users: list[asyncio.Task[None]] = []  # closed-loop users, running or done
        self.in_flight = 0
        self.done = self.ok = self.skipped = 0
        self.lags: list[float] = []
        self.idle = asyncio.Event()
        self.idle.set()

    def now(self) -> float:
        return self.clock.now() - self.t0

    def new_record(
        self, intended_s: float, request: BuiltRequest, tenant: str | None
    ) -> RequestRecord:
        record = RequestRecord(
            len(self.records), intended_s, math.nan, math.nan, request.stream,
            group=request.group, tenant=tenant,
        )  # fmt: skip
        self.records.append(record)
        return record

    def started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def finished(self, record: RequestRecord) -> None:
        self.in_flight -= 1
        self.done += 1
        if record.error_kind is None:
            self.ok += 1
        if not math.isnan(record.sent_s):
            self.lags.append(record.sent_s - record.intended_s)
        if not self.in_flight:
            self.idle.set()

    def launch(self, sender: Sender, request: BuiltRequest, record: RequestRecord) -> None:
        """Send in a task of its own (open loop), or record it skipped when at the cap."""
        if self.in_flight >= self.limits.max_in_flight:
            now = self.now()
            record.sent_s = record.end_s = now
            record.error_kind = "cancelled"
            record.error = f"skipped: {self.limits.max_in_flight} requests already in flight"
            self.skipped += 1
            self.done += 1
            return
        self.started()
        task = asyncio.get_running_loop().create_task(sender.send(request, record))
        self.tasks.add(task)
        task.add_done_callback(partial(self._task_done, record))

    def _task_done(self, record: RequestRecord, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            settle(record, "protocol", f"internal error in bench: {error!r}", self.now())
        settle(record, "cancelled", "cancelled before it was sent", self.now())
        self.finished(record)

    async def drain(self, until_s: float) -> None:
        """Wait for requests in flight until `until_s`, then cancel the rest."""
        remaining = until_s - self.now()
        if self.in_flight and remaining > 0:
            idle = asyncio.ensure_future(self.idle.wait())
            timer = asyncio.ensure_future(self.clock.sleep(remaining))
            await asyncio.wait((idle, timer), return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            timer.cancel()

    async def cancel(self, tasks: Sequence[asyncio.Future[Any]]) -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def report_progress(self) -> None:
        if self.on_progress is None:
            return
        interval = self.limits.progress_interval_s
        previous = 0
        while True:
            await self.clock.sleep(interval)
            self.on_progress(self.progress((self.done - previous) / interval))
            previous = self.done

    def progress(self, rate_rps: float) -> Progress:
        p99 = percentile_of(self.lags, 99)
        errors = self.done - self.ok
        sent = len(self.records) - self.skipped
        return Progress(self.now(), sent, self.done, self.ok, errors, self.in_flight, rate_rps, p99)

    def result(self, mode: Mode, scheduled: int) -> RunResult:
        now = self.now()
        for record in self.records:  # every record is settled; this only guards the contract
            settle(record, "cancelled", "never finished", now)
        cancelled = sum(r.error_kind == "cancelled" for r in self.records)
        return RunResult(
            mode, self.records, self.started_wall_s, now, scheduled, self.skipped, cancelled
        )


def settle(
    record: RequestRecord, kind: Literal["cancelled", "protocol"], why: str, now: float
) -> None:
    """Give a record that has no outcome yet this one (a task that never ran, or crashed)."""
    if math.isnan(record.sent_s):
        record.sent_s = now
    if math.isnan(record.end_s) or (kind == "protocol" and record.error_kind is None):
        record.end_s = now
        if record.error_kind is None:
            record.error_kind, record.error = kind, why


async def _open_loop(run: _Run, load: TenantLoad, sender: Sender, offsets: list[float]) -> int:
    """Launch request k at `offsets[k]` from the start, never waiting for earlier ones; return
    how many were due."""
    clock = run.clock
    count, index = len(offsets), 0
    while index < count:
        now = run.now()
        due = offsets[index]
        if due > now:
            await clock.sleep(due - now)
            continue
        batch_end = min(count, index + LAUNCH_BATCH)
        while index < batch_end and offsets[index] <= now:
            request = load.build(index)
            run.launch(sender, request, run.new_record(offsets[index], request, load.tenant))
            index += 1
        await clock.sleep(0)  # let the launched tasks write their requests
    return count


async def _closed_loop(run: _Run, load: TenantLoad, sender: Sender, max_requests: int) -> int:
    """Staff `load.users` until the duration or the request count runs out; return the count
    of requests this load sent. Users still in flight stay in `run.users` for the drain."""
    users = load.users
    assert users is not None
    clock, duration_s = run.clock, run.limits.duration_s
    workers: dict[int, asyncio.Task[None]] = {}
    sent = 0

    async def user(number: int) -> None:
        nonlocal sent
        while True:
            now = run.now()
            if now >= duration_s or sent >= max_requests:
                return
            if number >= active_users(users, now):
                return
            request = load.build(sent)
            sent += 1
            record = run.new_record(now, request, load.tenant)
            run.started()
            try:
                await sender.send(request, record)
            finally:
                settle(record, "cancelled", "cancelled before it was sent", run.now())
                record.intended_s = record.sent_s  # no schedule: intended is the send
                run.finished(record)
            if users.think_time_s:
                await clock.sleep(users.think_time_s)

    def staff() -> None:
        wanted = active_users(users, run.now())
        for number in range(wanted):
            if number not in workers or workers[number].done():
                workers[number] = asyncio.ensure_future(user(number))
                run.users.append(workers[number])

    staff()
    while run.now() < duration_s and sent < max_requests:
        if users.pattern is None and all(w.done() for w in workers.values()):
            break
        await clock.sleep(min(USER_TICK_S, duration_s - run.now()))
        staff()
    return sent


async def run_tenants(
    loads: Sequence[TenantLoad],
    *,
    clock: Clock,
    limits: RunLimits,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Drive every load at once from one start, then drain them together."""
    if not loads:
        raise ConfigError("a run needs at least one load")
    run = _Run(clock, limits, on_progress)
    senders: list[Sender] = []
    drives: list[asyncio.Future[int]] = []
    progress = asyncio.ensure_future(run.report_progress())
    try:
        for load in loads:
            senders.append(load.connect(run.t0))
        for load, sender in zip(loads, senders, strict=True):
            bound = limits.max_requests if load.max_requests is None else load.max_requests
            if load.intended_s is not None:
                offsets = [t for t in load.intended_s if t < limits.duration_s][:bound]
                drives.append(asyncio.ensure_future(_open_loop(run, load, sender, offsets)))
            else:
                drives.append(asyncio.ensure_future(_closed_loop(run, load, sender, bound)))
        scheduled = sum(await asyncio.gather(*drives))
        await run.drain(max(run.now(), limits.duration_s) + limits.drain_s)
    finally:
        await run.cancel([*drives, *run.tasks, *run.users])
        progress.cancel()
        for sender in senders:
            await sender.close()
    kinds = {"open" if load.intended_s is not None else "closed" for load in loads}
    mode: Mode = "mixed" if len(kinds) > 1 else "open" if "open" in kinds else "closed"
    return run.result(mode, scheduled)


async def run_open_loop(
    intended_s: Sequence[float],
    build: Callable[[int], BuiltRequest],
    *,
    clock: Clock,
    connect: Connect,
    limits: RunLimits,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Send request k (`build(k)`) at `intended_s[k]` from the start, within the limits."""
    load = TenantLoad(None, connect, build, intended_s=intended_s)
    return await run_tenants([load], clock=clock, limits=limits, on_progress=on_progress)


async def run_closed_loop(
    users: ClosedLoop,
    build: Callable[[int], BuiltRequest],
    *,
    clock: Clock,
    connect: Connect,
    limits: RunLimits,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Users send one request at a time until the duration or the request count runs out."""
    load = TenantLoad(None, connect, build, users=users)
    return await run_tenants([load], clock=clock, limits=limits, on_progress=on_progress)


def raise_open_files_limit(wanted: int = 65_536) -> int:
    """Raise this process's soft limit on open files towards `wanted` (one socket per stream:
    the common default of 1,024 caps a run near 1,000 concurrent streams). Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def run_with_uvloop(main: Coroutine[object, object, T]) -> T:
    """Run a bench coroutine on uvloop (the runner's throughput figures assume it), with the
    open-files limit raised for thousands of concurrent streams and the cyclic garbage
    collector paused.

    A full collection walks every record kept so far and stalls the sender for milliseconds:
    at 1,000 req/s the schedule lag p99 measured 7-18 ms with it and 3-4 ms without
    (benchmarks/bench_capacity.py). Objects without cycles are still freed at once by
    reference counting; cycles wait until the run ends, which `--duration` bounds.
    """
    raise_open_files_limit()
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()  # what exists before the run is never scanned again
    gc.disable()
    try:
        return uvloop.run(main)
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
        gc.collect()
