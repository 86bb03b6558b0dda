"""The discrete-event core of `benchmarks.autoscale_compare`: one traffic, one scaler, one run.

Virtual time only. A heap of events (arrivals, engine steps, scaler ticks, actuator deadlines)
drives a `VirtualClock`; each replica is the simulated engine's pure scheduler
(`fleetserve.engines.sim.batching.BatchScheduler`, stepped here as `SimEngine` steps it on a
clock); replicas come and go through `fleetserve.fleet.sim_actuator.SimActuator` (cold start,
drain, replica-seconds); the gateway's view is `fleetserve.telemetry.window.LoadWindow`, the
structure the real gateway fills. Requests go to the ready replica with the fewest outstanding
requests, or wait at the gateway while none is ready (the hold, bounded like the gateway's).
With a `GatewayQueue` cap per replica (the gateway's capacity queue, gateway/hold.py) replicas
at the cap are skipped and, when every ready one is at it, the request waits in the same
bounded queue at the gateway; the oldest waiter takes the slot a finishing request frees, and a
replica that turns ready takes waiters up to its cap at once (`newest_first` serves the newest
waiter instead: a diagnostic of the queue's order, not what the gateway does). Without it every
request goes straight to an engine and any backlog queues inside the engines. TTFT counts from
the arrival at the gateway, so time held or queued in an engine counts; the load window's TTFT,
as the gateway's, leaves out only time held while no replica was ready.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from fleetserve.bench.patterns import Pattern
from fleetserve.bench.schedule import schedule
from fleetserve.config import HoldSettings, TimeoutSettings
from fleetserve.engines.sim.batching import BatchScheduler, SimSequence, StepPlan
from fleetserve.engines.sim.profiles import SimProfile
from fleetserve.engines.sim.stats import EngineStats
from fleetserve.fleet.sim_actuator import SimActuator, SimEvent
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.window import LoadWindow

MODEL = "sim-a10g"
# After the traffic ends, in-flight work gets this long to finish before it counts as lost.
DRAIN_OUT_S = 900.0


class VirtualClock:
    """A `fleetserve.clock.Clock` whose time the event loop sets; nothing here ever sleeps.

    `fleetserve.testing.FakeClock` moves time for tasks parked in `sleep()` and lets the asyncio
    loop settle at each move; this study has no sleeping tasks (every wake-up is an event on the
    heap), so setting the time directly keeps a 20-minute run at a few seconds of CPU.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return 1_700_000_000.0 + self._now

    def set(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"time does not go backwards ({t} < {self._now})")
        self._now = t

    async def sleep(self, seconds: float) -> None:
        raise RuntimeError("VirtualClock does not sleep: schedule an event instead")


@dataclass(frozen=True, slots=True)
class Arrival:
    at_s: float
    prompt_tokens: int
    output_tokens: int


def make_workload(
    pattern: Pattern,
    *,
    duration_s: float,
    seed: int,
    prompt_tokens: tuple[int, int] = (384, 640),
    output_tokens: tuple[int, int] = (128, 256),
) -> list[Arrival]:
    """Poisson arrivals of `pattern` (the bench schedule) with uniform prompt/output lengths."""
    rng = random.Random(seed)
    times = schedule(pattern, duration_s=duration_s, arrivals="poisson", rng=rng)
    return [Arrival(t, rng.randint(*prompt_tokens), rng.randint(*output_tokens)) for t in times]


@dataclass(slots=True)
class Request:
    arrival: Arrival
    replica: str | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    failed: str | None = None
    held_s: float = 0.0
    cold_hold: bool = False  # held while no replica was ready (not at capacity)

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_s is None:
            return None
        return self.first_token_s - self.arrival.at_s


@dataclass(slots=True)
class Engine:
    """One ready (or draining) replica: the simulated engine's scheduler and its counters."""

    id: str
    scheduler: BatchScheduler
    requests: dict[SimSequence, Request] = field(default_factory=dict)
    plan: StepPlan | None = None
    busy_s: float = 0.0
    tokens: int = 0
    admitted: int = 0

    @property
    def in_flight(self) -> int:
        return len(self.requests)


@dataclass(frozen=True, slots=True)
class GatewayQueue:
    """The gateway's capacity queue in a run."""

    max_concurrency: int | None = None  # per replica; None: every request straight to an engine
    newest_first: bool = False  # serve the newest waiter first (diagnostic; the gateway: FIFO)

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {self.max_concurrency}")


NO_QUEUE = GatewayQueue()


class Scaler(Protocol):
    """What the study runs: a name, a tick period (None: never ticks) and the tick itself.

    `gateway` is how the gateway queues in its runs.
    """

    name: str
    gateway: GatewayQueue

    @property
    def period_s(self) -> float | None: ...

    def initial_replicas(self) -> int: ...

    async def tick(self, sim: Simulation) -> None: ...


@dataclass(frozen=True, slots=True)
class RunResult:
    scaler: str
    requests: tuple[Request, ...]
    replica_seconds: float
    peak_replicas: int
    duration_s: float
    timeline: tuple[tuple[float, int, int], ...]
    """(time, active replicas (starting + ready), ready replicas) at every change."""


class Simulation:
    """One run: the fleet, the gateway's window and the event heap. Scalers read and act on it."""

    def __init__(
        self,
        profile: SimProfile,
        *,
        cold_start_s: float,
        drain_grace_s: float,
        hold: HoldSettings | None = None,
        timeouts: TimeoutSettings | None = None,
        window_s: float = 30.0,
        gateway: GatewayQueue | None = None,
    ) -> None:
        self.profile = profile
        self.gateway = gateway or GatewayQueue()
        self.max_concurrency = self.gateway.max_concurrency
        self.clock = VirtualClock(-cold_start_s)
        self.window = LoadWindow(window_s)
        self.hold = hold or HoldSettings()
        self.timeouts = timeouts or TimeoutSettings()
        self.engines: dict[str, Engine] = {}
        self.ready: list[str] = []
        self.held: deque[Request] = deque()
        self.actuator = SimActuator(
            self.clock,
            cold_start_s=cold_start_s,
            drain_grace_s=drain_grace_s,
            in_flight=lambda rid: self.engines[rid].in_flight if rid in self.engines else 0,
            listener=self._on_actuator_event,
            model=MODEL,
        )
        self._heap: list[tuple[float, int, str, object]] = []
        self._order = itertools.count()
        self._timeline: list[tuple[float, int, int]] = []

    # -- for scalers --------------------------------------------------------------------
    def scale_to(self, n: int) -> None:
        self.actuator.scale_to(n)
        self._schedule_due()

    def actuated(self) -> None:
        """Call after acting on `actuator` directly, so its next deadline gets an event."""
        self._schedule_due()

    def active(self) -> int:
        return len(self.actuator.ids(ReplicaState.STARTING)) + len(self.ready)

    # -- the event loop -----------------------------------------------------------------
    def _push(self, at: float, kind: str, data: object = None) -> None:
        heapq.heappush(self._heap, (at, next(self._order), kind, data))

    def _schedule_due(self) -> None:
        due = self.actuator.next_due()
        if due is not None:
            self._push(due, "due")

    async def run(
        self, arrivals: list[Arrival], scaler: Scaler, duration_s: float, warmup_s: float = 0.0
    ) -> RunResult:
        """Serve `arrivals` (offsets from 0) under `scaler`; figures count from `warmup_s`.

        The first replicas are launched a cold start before 0, so they are ready at 0. Requests
        arriving before `warmup_s` are served but not reported, and replica-seconds and peak
        count over [warmup_s, duration_s): the scalers start from a fleet that has settled.
        """
        self.scale_to(scaler.initial_replicas())
        self.clock.set(0.0)
        self.actuator.advance()
        requests = [Request(a) for a in arrivals]
        for request in requests:
            self._push(request.arrival.at_s, "arrival", request)
        if scaler.period_s is not None:
            self._push(0.0, "tick")
        self._push(warmup_s, "start")
        self._push(duration_s, "end")
        base_rs = 0.0
        replica_seconds: float | None = None
        peak = 0
        limit = duration_s + DRAIN_OUT_S
        while self._heap:
            at, _, kind, data = heapq.heappop(self._heap)
            if at > limit:
                break
            self.clock.set(max(at, self.clock.now()))
            if kind == "arrival":
                assert isinstance(data, Request)
                self._arrive(data)
            elif kind == "step":
                assert isinstance(data, str)
                self._step_done(data)
            elif kind == "due":
                self.actuator.advance()
                self._schedule_due()
            elif kind == "tick":
                self._expire_holds()
                await scaler.tick(self)
                assert scaler.period_s is not None
                if at + scaler.period_s < duration_s:
                    self._push(at + scaler.period_s, "tick")
            elif kind == "start":
                base_rs = self.actuator.replica_seconds().total_s
            elif kind == "end":
                replica_seconds = self.actuator.replica_seconds().total_s - base_rs
            if warmup_s <= at < duration_s:
                peak = max(peak, self.active())
        self._expire_holds()
        for request in requests:
            if request.failed is None and request.finished_s is None:
                request.failed = "unfinished at the end of the drain-out"
            elif (
                request.failed is None
                and request.ttft_s is not None
                and request.ttft_s > self.timeouts.first_byte_s
            ):
                request.failed = "first byte timeout"
        assert replica_seconds is not None
        return RunResult(
            scaler=scaler.name,
            requests=tuple(r for r in requests if r.arrival.at_s >= warmup_s),
            replica_seconds=replica_seconds,
            peak_replicas=peak,
            duration_s=duration_s - warmup_s,
            timeline=tuple((t - warmup_s, a, r) for t, a, r in self._timeline),
        )

    # -- gateway ------------------------------------------------------------------------
    def _arrive(self, request: Request) -> None:
        now = self.clock.now()
        arrival = request.arrival
        self.window.arrived(MODEL, now, arrival.prompt_tokens + arrival.output_tokens)
        rid = self._pick()
        if rid is not None:
            self._dispatch(request, rid)
        elif len(self.held) >= self.hold.max_held:
            self._fail(request, "503: hold queue full")
        else:
            self.window.hold_started(MODEL, now)
            request.cold_hold = not self.ready
            self.held.append(request)

    def _has_room(self, rid: str) -> bool:
        cap = self.max_concurrency
        return cap is None or self.engines[rid].in_flight < cap

    def _pick(self) -> str | None:
        """Least outstanding requests over ready replicas with room (ties: earliest launched)."""
        best: str | None = None
        best_load = 0
        for rid in self.ready:
            load = self.engines[rid].in_flight
            if (best is None or load < best_load) and self._has_room(rid):
                best, best_load = rid, load
        return best

    def _unhold(self) -> Request:
        now = self.clock.now()
        request = self.held.pop() if self.gateway.newest_first else self.held.popleft()
        self.window.hold_ended(MODEL, now)
        request.held_s = now - request.arrival.at_s
        return request

    def _release(self, rid: str) -> None:
        """Held requests, oldest first, to replica `rid` while it has room."""
        while self.held and self._has_room(rid):
            self._dispatch(self._unhold(), rid)

    def _expire_holds(self) -> None:
        now = self.clock.now()
        while self.held and now - self.held[0].arrival.at_s >= self.hold.timeout_s:
            request = self.held.popleft()
            self.window.hold_ended(MODEL, now)
            self._fail(request, "503: held past the hold timeout")

    def _fail(self, request: Request, reason: str) -> None:
        request.failed = reason
        self.window.finished(MODEL, self.clock.now())

    def _dispatch(self, request: Request, rid: str) -> None:
        engine = self.engines[rid]
        arrival = request.arrival
        seq = SimSequence(
            prompt_len=arrival.prompt_tokens,
            output_len=arrival.output_tokens,
            arrival_s=self.clock.now(),
        )
        engine.scheduler.add(seq)
        engine.requests[seq] = request
        engine.admitted += 1
        request.replica = rid
        if engine.plan is None:
            self._plan(engine)

    # -- engines ------------------------------------------------------------------------
    def _plan(self, engine: Engine) -> None:
        now = self.clock.now()
        plan = engine.scheduler.plan(now)
        engine.plan = plan
        if plan is not None:
            engine.busy_s += plan.duration_s
            self._push(now + plan.duration_s, "step", engine.id)

    def _step_done(self, rid: str) -> None:
        engine = self.engines.get(rid)
        if engine is None or engine.plan is None:
            return  # removed while the step ran
        now = self.clock.now()
        produced = engine.scheduler.complete(engine.plan, now)
        engine.tokens += len(produced)
        for seq in produced:
            request = engine.requests[seq]
            if seq.generated == 1:
                request.first_token_s = now
                # As the gateway does, the window leaves a cold-start hold out (replicas cannot
                # shorten it) and keeps time held at capacity (more replicas would).
                ttft_s = now - request.arrival.at_s - (request.held_s if request.cold_hold else 0)
                self.window.observe_ttft(MODEL, now, ttft_s)
            if seq.finished:
                request.finished_s = now
                del engine.requests[seq]
                self.window.finished(MODEL, now)
        if self.held and rid in self.ready:
            self._release(rid)  # the slots that finished requests freed go to the oldest waiters
        self._plan(engine)
        if engine.in_flight == 0 and rid not in self.ready:
            self.actuator.advance()  # a draining replica that just emptied goes now

    def _on_actuator_event(self, event: SimEvent) -> None:
        rid = event.replica_id
        if event.kind == "ready":
            self.engines[rid] = Engine(rid, BatchScheduler(self.profile, self._stats()))
            self.ready.append(rid)
            if self.max_concurrency is None:
                while self.held:  # every waiter, each to the least loaded replica
                    self._dispatch(self._unhold(), self._pick() or rid)
            else:
                self._release(rid)
        elif event.kind == "draining":
            self.ready.remove(rid)
        elif event.kind == "removed":
            engine = self.engines.pop(rid, None)
            if engine is not None:
                for request in engine.requests.values():
                    self._fail(request, "cut at the drain deadline")
            if rid in self.ready:
                self.ready.remove(rid)
        self._timeline.append((event.at, self.active(), len(self.ready)))

    def _stats(self) -> EngineStats:
        return EngineStats(max_model_len=self.profile.max_model_len)
