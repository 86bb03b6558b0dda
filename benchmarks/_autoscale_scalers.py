"""The three scalers of `benchmarks.autoscale_compare`, each acting on a `Simulation`.

- `FleetserveScaler`: fleetserve's own `AutoscaleLoop` (observe, `decide`, actuate) with an
  observer that reads the simulated fleet and the gateway's `LoadWindow`, as `FleetObserver`
  reads the `Fleet` in `fleetserve up`.
- `HpaScaler`: the modelled HPA (`benchmarks._autoscale_hpa`) at its 15 s sync period.
- `FixedScaler`: a constant count; never ticks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks._autoscale_hpa import HpaController, HpaSettings, VllmPodModel
from benchmarks._autoscale_study import MODEL, NO_QUEUE, GatewayQueue, Simulation
from fleetserve.autoscale.loop import AutoscaleLoop
from fleetserve.autoscale.observation import Observation, ReplicaLoad
from fleetserve.config import AutoscaleSettings
from fleetserve.routing.snapshot import ReplicaState


class SimObserver:
    """The `Observer` of `AutoscaleLoop` over a `Simulation`.

    Engine signals are read at the decision instant (the real gateway scrapes them every 1 s,
    so this is at most 1 s fresher than production).
    """

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    async def observe(self, now: float, current: int) -> Observation:
        sim = self.sim
        loads = []
        for rid in sim.ready:
            engine = sim.engines[rid]
            gauges = engine.scheduler.gauges()
            loads.append(
                ReplicaLoad(
                    in_flight=engine.in_flight,
                    running=float(gauges.running),
                    waiting=float(gauges.waiting),
                    kv_usage_frac=gauges.kv_usage_frac,
                )
            )
        draining = [rid for rid in sim.engines if rid not in sim.ready]
        load = sim.window.snapshot(MODEL, now)
        return Observation(
            now=now,
            current=current,
            ready_loads=tuple(loads),
            starting=len(sim.actuator.ids(ReplicaState.STARTING)),
            draining=len(draining),
            in_flight_not_ready=sum(sim.engines[rid].in_flight for rid in draining),
            held=load.held,
            ttft_p95_s=load.ttft_p95_s,
            arrival_rps=load.arrival_rps,
            arrival_tps=load.demand_tps,
        )


@dataclass
class FleetserveScaler:
    settings: AutoscaleSettings
    name: str = "fleetserve"
    gateway: GatewayQueue = NO_QUEUE  # the gateway's cap per replica and its queue
    reasons: list[tuple[float, int, str]] = field(default_factory=list)
    _loop: AutoscaleLoop | None = None

    @property
    def period_s(self) -> float | None:
        return self.settings.period_s

    def initial_replicas(self) -> int:
        return max(self.settings.min_replicas, 1)

    async def tick(self, sim: Simulation) -> None:
        if self._loop is None:
            self._loop = AutoscaleLoop(
                MODEL, SimObserver(sim), sim.actuator, self.settings, sim.clock
            )
        decision = await self._loop.step()
        sim.actuated()  # the loop called the actuator itself: wake at its next deadline
        if decision is not None and decision.desired != decision.current:
            self.reasons.append((decision.at, decision.desired, decision.reason))


@dataclass
class HpaScaler:
    settings: HpaSettings
    pod: VllmPodModel
    name: str = "hpa-cpu"
    gateway: GatewayQueue = NO_QUEUE
    reasons: list[tuple[float, int, str]] = field(default_factory=list)
    _controller: HpaController | None = None
    _last: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    _last_at: float | None = None

    @property
    def period_s(self) -> float | None:
        return self.settings.sync_period_s

    def initial_replicas(self) -> int:
        return self.settings.min_replicas

    async def tick(self, sim: Simulation) -> None:
        if self._controller is None:
            self._controller = HpaController(self.settings)
        now = sim.clock.now()
        window_s = self.settings.sync_period_s
        cpu: list[float] = []
        memory: list[float] = []
        unready = len(sim.actuator.ids(ReplicaState.STARTING))
        samples: dict[str, tuple[float, int, int]] = {}
        for rid in sim.ready:
            engine = sim.engines[rid]
            samples[rid] = (engine.busy_s, engine.admitted, engine.tokens)
            before = self._last.get(rid)
            if before is None:
                # Ready since the last sync: no CPU sample wholly after readiness yet (the HPA
                # sets such pods aside during the CPU initialization period).
                unready += 1
                continue
            busy_s, admitted, tokens = (a - b for a, b in zip(samples[rid], before, strict=True))
            cpu.append(self.pod.cpu_utilisation(busy_s, int(admitted), int(tokens), window_s))
            memory.append(self.pod.memory_utilisation())
        self._last = samples
        current = sim.active()
        desired = self._controller.decide(now, current, cpu, memory, unready)
        if desired != current:
            sim.scale_to(desired)
            self.reasons.append((now, desired, self._controller.last_reason))


@dataclass
class FixedScaler:
    replicas: int
    name: str = "fixed"
    gateway: GatewayQueue = NO_QUEUE

    @property
    def period_s(self) -> float | None:
        return None

    def initial_replicas(self) -> int:
        return self.replicas

    async def tick(self, sim: Simulation) -> None:
        raise AssertionError("a fixed fleet never ticks")
