"""The autoscaling policy on a fake clock: replica sequences over time, then each guard alone.

Scenario tests drive `decide` once per period with `now` advancing by `period_s`, against a
small model of the actuator: a replica asked for starts at once and turns ready after a cold
start of `cold_periods` periods; a scale-down removes starting replicas first. Demand is the
number of concurrent requests, spread evenly over the ready replicas (held at the gateway
while none is ready); each replica has 8 slots, so requests beyond 8 wait in its engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError

from fleetserve.autoscale import guards
from fleetserve.autoscale.decision import ScaleEvent, TimedRecommendation
from fleetserve.autoscale.policy import (
    SIGNALS,
    AutoscaleSettings,
    AutoscaleState,
    Decision,
    Direction,
    Observation,
    ReplicaLoad,
    decide,
)
from fleetserve.config import ModelSpec, ScalingPolicy, ScalingRules

SLOTS = 8
PERIOD_S = 5.0


def runs(*pairs: tuple[int, int]) -> list[int]:
    """[(1, 3), (5, 2)] -> [1, 1, 1, 5, 5]: long sequences read better run-length encoded."""
    return [value for value, count in pairs for _ in range(count)]


@dataclass
class FakeFleet:
    """Replicas as an actuator keeps them: ready ones, and starting ones counting down."""

    ready: int
    cold_periods: int
    starting: list[int] = field(default_factory=list)

    def apply(self, desired: int) -> None:
        if desired > self.ready + len(self.starting):
            self.starting += [self.cold_periods] * (desired - self.ready - len(self.starting))
        while desired < self.ready + len(self.starting):
            if self.starting:
                self.starting.pop()
            else:
                self.ready -= 1

    def tick(self) -> None:
        self.starting = [left - 1 for left in self.starting]
        self.ready += sum(1 for left in self.starting if left <= 0)
        self.starting = [left for left in self.starting if left > 0]

    def loads(self, demand: int, *, engine: bool, kv: bool) -> tuple[ReplicaLoad, ...]:
        loads = []
        for i in range(self.ready):
            c = demand // self.ready + (1 if i < demand % self.ready else 0)
            loads.append(
                ReplicaLoad(
                    in_flight=c,
                    running=min(c, SLOTS) if engine else None,
                    waiting=max(0, c - SLOTS) if engine else None,
                    kv_usage_frac=min(1.0, c / 10) if kv else None,
                )
            )
        return tuple(loads)


@dataclass
class Run:
    desired: list[int]
    ready: list[int]
    decisions: list[Decision]


def drive(
    demand: Sequence[int],
    config: AutoscaleSettings,
    *,
    ready: int = 1,
    cold_periods: int = 2,
    engine: bool = True,
    kv: bool = False,
    crash_at: Sequence[int] = (),
) -> Run:
    fleet = FakeFleet(ready=ready, cold_periods=cold_periods)
    state = AutoscaleState()
    run = Run([], [], [])
    for i, requests in enumerate(demand):
        if i in crash_at:
            fleet.ready -= 1
        observation = Observation(
            now=1000.0 + i * config.period_s,
            current=fleet.ready + len(fleet.starting),
            ready_loads=fleet.loads(requests, engine=engine, kv=kv),
            starting=len(fleet.starting),
            held=requests if fleet.ready == 0 else 0,
            arrival_rps=requests / 10,
        )
        decision, state = decide(observation, state, config)
        run.desired.append(decision.desired)
        run.ready.append(fleet.ready)
        run.decisions.append(decision)
        fleet.apply(decision.desired)
        fleet.tick()
    return run


BASE = AutoscaleSettings(max_replicas=8, period_s=PERIOD_S)
TO_ZERO = BASE.model_copy(update={"min_replicas": 0, "scale_to_zero_after_s": 30.0})
NO_DOWN_WINDOW = BASE.model_copy(
    update={
        "scale_down": ScalingRules(
            stabilization_window_s=0.0,
            policies=(ScalingPolicy(kind="percent", value=100, period_s=15.0),),
        )
    }
)
FLAPPING = [6, 6, 30, 30] * 5


@pytest.mark.parametrize(
    ("demand", "config", "ready", "expected"),
    [
        pytest.param([6] * 12, BASE, 1, runs((1, 12)), id="steady-at-target"),
        pytest.param([13] * 12, BASE, 2, runs((2, 12)), id="steady-within-tolerance"),
        # 7 requests on one replica is ratio 1.17, past the 0.1 tolerance: the first decision
        # has no earlier recommendation in its up window (as the HPA), so it acts at once; the
        # 60 s down window then keeps the second replica though 3.5 a replica is under target.
        pytest.param([7] * 6, BASE, 1, runs((2, 6)), id="steady-just-over"),
        # Ramp by 6 requests every two periods: each step is seen twice, then granted.
        pytest.param(
            [6, 6, 12, 12, 18, 18, 24, 24, 30, 30, 36, 36, 48, 48, 48, 48],
            BASE,
            1,
            runs((1, 3), (2, 2), (3, 2), (4, 2), (5, 2), (6, 2), (8, 3)),
            id="ramp",
        ),
        # Spike 6 -> 40: +4 at the scale-up policy's limit, the rest 15 s later; the peak is
        # held for the 60 s down window after the spike ends, then 100% may go at once.
        pytest.param(
            [6] * 3 + [40] * 12 + [6] * 20,
            BASE,
            1,
            runs((1, 4), (5, 3), (7, 19), (1, 9)),
            id="spike",
        ),
        pytest.param([3] * 4 + [0] * 12, TO_ZERO, 1, runs((1, 10), (0, 6)), id="idle-to-zero"),
        pytest.param([3] * 4 + [0] * 12, BASE, 1, runs((1, 16)), id="idle-with-min-1"),
        # Bursts of 30 every other 10 s: granted once, then the down window keeps the fleet.
        pytest.param(FLAPPING, BASE, 1, runs((1, 3), (5, 17)), id="flapping-load"),
        # The same load without a down window: only the no-flip guard slows the flapping.
        pytest.param(
            FLAPPING,
            NO_DOWN_WINDOW,
            1,
            runs((1, 3), (5, 5), (1, 3), (5, 5), (1, 3), (5, 1)),
            id="flapping-without-down-window",
        ),
        # From zero: three requests held wake one replica at once, without the up window.
        pytest.param([0] * 3 + [3] * 8, TO_ZERO, 0, runs((0, 3), (1, 8)), id="scale-from-zero"),
        # Twenty held: the load asks for ceil(20 / 6) = 4, all at once (4 pods per 15 s).
        pytest.param([0] * 2 + [20] * 6, TO_ZERO, 0, runs((0, 2), (4, 6)), id="wake-up-burst"),
    ],
)
def test_replica_sequence(
    demand: list[int], config: AutoscaleSettings, ready: int, expected: list[int]
) -> None:
    run = drive(demand, config, ready=ready)
    assert run.desired == expected
    for decision in run.decisions:
        assert decision.reason
        assert set(decision.signals) == set(SIGNALS)


def test_wake_up_does_not_rerequest_starting_replicas() -> None:
    run = drive([0] * 2 + [20] * 6, TO_ZERO, ready=0, cold_periods=4)
    assert run.desired == runs((0, 2), (4, 6))
    assert run.ready == runs((0, 6), (4, 2))
    assert "wake-up: 20 held" in run.decisions[2].reason


def test_missing_engine_metrics_scale_on_gateway_counts() -> None:
    demand = [6, 6, 12, 12, 18, 18, 24, 24]
    with_engine = drive(demand, BASE, engine=True)
    without = drive(demand, BASE, engine=False)
    assert without.desired == with_engine.desired == runs((1, 3), (2, 2), (3, 2), (4, 1))
    assert without.decisions[-1].signals["queue"] is None


def test_missing_kv_never_scales_down() -> None:
    """One replica of four reports a nearly empty KV cache; the other three count as at target."""
    loads = (ReplicaLoad(in_flight=6, kv_usage_frac=0.1),) + (ReplicaLoad(in_flight=6),) * 3
    decision, _ = decide(Observation(now=0.0, current=4, ready_loads=loads), AutoscaleState(), BASE)
    assert decision.signals["kv_cache"] == 4
    assert decision.desired == 4


def test_missing_kv_counts_idle_when_scaling_up() -> None:
    """One replica of four reports a full KV cache; the silent three absorb it."""
    loads = (ReplicaLoad(in_flight=6, kv_usage_frac=0.95),) + (ReplicaLoad(in_flight=6),) * 3
    decision, _ = decide(Observation(now=0.0, current=4, ready_loads=loads), AutoscaleState(), BASE)
    assert decision.signals["kv_cache"] == 4
    assert decision.direction is Direction.HOLD


def test_crashed_replica_is_replaced() -> None:
    run = drive([18] * 8, BASE, ready=3, crash_at=[3])
    assert run.desired == runs((3, 8))
    assert run.ready == runs((3, 3), (2, 2), (3, 3))
    replaced = run.decisions[3]
    assert (replaced.current, replaced.desired, replaced.direction) == (2, 3, Direction.UP)
    assert "replacing 1 lost" in replaced.reason


def test_kv_cache_signal_grows_the_fleet() -> None:
    """At 9 requests a replica the KV cache is 90% full (target 80%) though load is near target."""
    config = BASE.model_copy(update={"target_concurrency": 9.5})
    run = drive([9] * 4, config, kv=True)
    assert run.desired == runs((2, 4))
    first = run.decisions[0]
    assert (first.signals["load"], first.signals["kv_cache"]) == (1, 2)
    assert first.reason.startswith("kv_cache 0.90/replica vs target 0.8")


# -- each guard alone -------------------------------------------------------------------------


def one(
    loads: Sequence[ReplicaLoad],
    config: AutoscaleSettings = BASE,
    state: AutoscaleState | None = None,
    *,
    now: float = 100.0,
    current: int | None = None,
    **observed: float | int | None,
) -> Decision:
    observation = Observation(
        now=now,
        current=len(loads) if current is None else current,
        ready_loads=tuple(loads),
        **observed,  # type: ignore[arg-type]
    )
    decision, _ = decide(observation, state or AutoscaleState(), config)
    return decision


def at_load(per_replica: float, replicas: int) -> list[ReplicaLoad]:
    """Loads whose concurrency totals per_replica * replicas (engine counts carry the fraction)."""
    return [ReplicaLoad(in_flight=0, running=per_replica, waiting=0.0)] * replicas


@pytest.mark.parametrize(
    ("per_replica", "expected"),
    [
        pytest.param(6.0, 10, id="at-target"),
        pytest.param(6.54, 10, id="ratio-1.09-holds"),
        pytest.param(6.66, 12, id="ratio-1.11-grows"),
        pytest.param(5.46, 10, id="ratio-0.91-holds"),
        pytest.param(5.34, 9, id="ratio-0.89-shrinks"),
    ],
)
def test_tolerance_band(per_replica: float, expected: int) -> None:
    config = BASE.model_copy(update={"max_replicas": 20})
    assert one(at_load(per_replica, 10), config).signals["load"] == expected


def test_tolerance_band_is_configurable() -> None:
    config = BASE.model_copy(update={"max_replicas": 20, "tolerance": 0.2})
    assert one(at_load(7.1, 10), config).signals["load"] == 10


def recs(*pairs: tuple[float, int]) -> tuple[TimedRecommendation, ...]:
    return tuple(TimedRecommendation(at, replicas) for at, replicas in pairs)


@pytest.mark.parametrize(
    ("recommendation", "earlier", "expected"),
    [
        pytest.param(8, recs((95, 6), (98, 7)), 6, id="up-takes-min-of-up-window"),
        pytest.param(8, recs((85, 3), (95, 6)), 6, id="up-ignores-older-than-window"),
        pytest.param(8, recs((90, 3)), 8, id="up-window-edge-excluded"),
        pytest.param(1, recs((50, 3), (70, 2)), 3, id="down-takes-max-of-down-window"),
        pytest.param(2, recs((30, 9), (70, 3)), 3, id="down-ignores-older-than-window"),
        pytest.param(2, recs((95, 6)), 4, id="down-never-above-baseline"),
        pytest.param(4, recs((95, 8), (96, 1)), 4, id="mixed-window-holds"),
    ],
)
def test_stabilization(
    recommendation: int, earlier: tuple[TimedRecommendation, ...], expected: int
) -> None:
    stabilized = guards.stabilize(
        recommendation, earlier, now=100.0, baseline=4, up_window_s=10.0, down_window_s=60.0
    )
    assert stabilized == expected


UP = BASE.scale_up  # max(+4 pods, +100%) per 15 s
PODS_2 = ScalingPolicy(kind="pods", value=2, period_s=60.0)
PERCENT_50 = ScalingPolicy(kind="percent", value=50, period_s=60.0)


def rules(*policies: ScalingPolicy, select: str = "max") -> ScalingRules:
    return ScalingRules.model_validate(
        {"stabilization_window_s": 0, "policies": policies, "select": select}
    )


@pytest.mark.parametrize(
    ("baseline", "events", "scaling", "expected"),
    [
        pytest.param(2, (), UP, 6, id="hpa-default-pods-win-small"),
        pytest.param(10, (), UP, 20, id="hpa-default-percent-wins-large"),
        pytest.param(6, (ScaleEvent(95, 4),), UP, 6, id="period-spent"),
        pytest.param(6, (ScaleEvent(80, 4),), UP, 12, id="period-passed"),
        pytest.param(3, (), rules(PODS_2, PERCENT_50), 5, id="select-max"),
        pytest.param(3, (), rules(PODS_2, PERCENT_50, select="min"), 5, id="select-min-ceil"),
        pytest.param(10, (), rules(PODS_2, PERCENT_50, select="min"), 12, id="select-min"),
        pytest.param(3, (), rules(PODS_2, select="disabled"), 3, id="disabled"),
        pytest.param(0, (), rules(PERCENT_50), 0, id="percent-of-zero"),
    ],
)
def test_scale_up_limit(
    baseline: int, events: tuple[ScaleEvent, ...], scaling: ScalingRules, expected: int
) -> None:
    assert guards.scale_up_limit(baseline, events, scaling, now=100.0) == expected


@pytest.mark.parametrize(
    ("baseline", "events", "scaling", "expected"),
    [
        pytest.param(8, (), BASE.scale_down, 0, id="hpa-default-100-percent"),
        pytest.param(8, (), rules(PODS_2, PERCENT_50), 4, id="select-max-change"),
        pytest.param(8, (), rules(PODS_2, PERCENT_50, select="min"), 6, id="select-min-change"),
        pytest.param(6, (ScaleEvent(90, -2),), rules(PODS_2), 6, id="period-spent"),
        pytest.param(8, (ScaleEvent(90, -1),), rules(PERCENT_50), 4, id="from-period-start"),
        pytest.param(8, (), rules(PODS_2, select="disabled"), 8, id="disabled"),
    ],
)
def test_scale_down_limit(
    baseline: int, events: tuple[ScaleEvent, ...], scaling: ScalingRules, expected: int
) -> None:
    assert guards.scale_down_limit(baseline, events, scaling, now=100.0) == expected


def test_step_policy_caps_and_says_so() -> None:
    decision = one(at_load(30.0, 2))
    assert decision.recommendation == 10
    assert decision.desired == 6
    assert "capped to +4 by the scale-up policy -> 6" in decision.reason


@pytest.mark.parametrize(
    ("last", "since_s", "desired", "blocked"),
    [
        pytest.param(Direction.DOWN, 10.0, 5, True, id="up-after-down-inside"),
        pytest.param(Direction.DOWN, 15.0, 5, False, id="up-after-down-at-edge"),
        pytest.param(Direction.UP, 10.0, 5, False, id="up-after-up"),
        pytest.param(Direction.UP, 10.0, 3, True, id="down-after-up-inside"),
        pytest.param(None, 0.0, 3, False, id="no-history"),
    ],
)
def test_no_flip(last: Direction | None, since_s: float, desired: int, blocked: bool) -> None:
    flipped = guards.flips(
        desired,
        4,
        last_direction=last,
        last_change_at=None if last is None else 100.0 - since_s,
        now=100.0,
        no_flip_s=15.0,
    )
    assert flipped is blocked


def test_no_flip_holds_and_says_so() -> None:
    state = AutoscaleState(desired=2, last_direction=Direction.DOWN, last_change_at=95.0)
    decision = one(at_load(30.0, 2), state=state)
    assert decision.desired == 2
    assert "no flip within 15s of the last down -> hold 2" in decision.reason


@pytest.mark.parametrize(
    ("per_replica", "replicas", "config", "expected", "says"),
    [
        pytest.param(60.0, 6, BASE, 8, "capped at max_replicas 8", id="max"),
        pytest.param(
            0.0,
            4,
            BASE.model_copy(update={"min_replicas": 3}),
            3,
            "raised to min_replicas 3",
            id="min",
        ),
        pytest.param(0.0, 1, TO_ZERO, 1, "kept at 1 until idle for 30s", id="min-zero-not-idle"),
    ],
)
def test_bounds(
    per_replica: float, replicas: int, config: AutoscaleSettings, expected: int, says: str
) -> None:
    state = AutoscaleState(desired=replicas)
    decision = one(at_load(per_replica, replicas), config, state, arrival_rps=1.0)
    assert decision.desired == expected
    assert says in decision.reason


def test_max_replicas_applies_on_wake_up() -> None:
    config = TO_ZERO.model_copy(update={"max_replicas": 2})
    decision = one([], config, AutoscaleState(desired=0), current=0, held=50)
    assert decision.desired == 2


def test_scale_to_zero_waits_for_idle_period() -> None:
    state = AutoscaleState(desired=1, idle_since=100.0)
    early = one([ReplicaLoad(in_flight=0)], TO_ZERO, state, now=129.0)
    assert early.desired == 1
    late = one([ReplicaLoad(in_flight=0)], TO_ZERO, state, now=130.0)
    assert late.desired == 0
    assert "idle 30s" in late.reason


@pytest.mark.parametrize(
    "observed",
    [
        pytest.param({"arrival_rps": 0.5}, id="arrivals"),
        pytest.param({"held": 1}, id="held"),
        pytest.param({"in_flight_not_ready": 1}, id="draining-in-flight"),
    ],
)
def test_activity_resets_idle(observed: dict[str, float | int]) -> None:
    state = AutoscaleState(desired=1, idle_since=0.0)
    decision, after = decide(
        Observation(now=500.0, current=1, ready_loads=(ReplicaLoad(in_flight=0),), **observed),  # type: ignore[arg-type]
        state,
        TO_ZERO,
    )
    assert decision.desired == 1
    assert after.idle_since is None


def test_busy_replica_resets_idle() -> None:
    busy = ReplicaLoad(in_flight=0, running=1.0)
    decision = one([busy], TO_ZERO, AutoscaleState(desired=1, idle_since=0.0), now=500.0)
    assert decision.desired == 1


def test_asleep_fleet_stays_asleep() -> None:
    decision = one([], TO_ZERO, AutoscaleState(desired=0), current=0)
    assert (decision.desired, decision.direction) == (0, Direction.HOLD)
    assert decision.reason == "no signal measured: hold at 0"


# -- TTFT and arrival signals ------------------------------------------------------------------

SLO = BASE.model_copy(update={"ttft_slo_s": 1.0})


@pytest.mark.parametrize(
    ("p95_s", "starting", "state", "expected"),
    [
        pytest.param(2.0, 0, AutoscaleState(desired=3), 4, id="over-slo-one-more"),
        pytest.param(1.05, 0, AutoscaleState(desired=3), 3, id="within-tolerance-holds"),
        pytest.param(0.95, 0, AutoscaleState(desired=3), 3, id="near-slo-holds"),
        pytest.param(0.5, 0, AutoscaleState(desired=3), None, id="well-under-no-demand"),
        pytest.param(None, 0, AutoscaleState(desired=3), None, id="not-measured"),
        pytest.param(2.0, 1, AutoscaleState(desired=3), 3, id="starting-holds"),
        pytest.param(
            2.0,
            0,
            AutoscaleState(desired=3, last_direction=Direction.UP, last_change_at=90.0),
            3,
            id="settling-after-scale-up",
        ),
    ],
)
def test_ttft_signal(
    p95_s: float | None, starting: int, state: AutoscaleState, expected: int | None
) -> None:
    decision = one(
        at_load(6.0, 3 - starting), SLO, state, current=3, starting=starting, ttft_p95_s=p95_s
    )
    assert decision.signals["ttft"] == expected


def test_ttft_over_slo_grows_the_fleet_at_target_load() -> None:
    decision = one(at_load(6.0, 3), SLO, AutoscaleState(desired=3), ttft_p95_s=2.0)
    assert (decision.desired, decision.direction) == (4, Direction.UP)
    assert decision.reason.startswith("TTFT p95 2.00s vs SLO 1s over -> 4")


def test_ttft_near_slo_prevents_scale_down() -> None:
    decision = one(at_load(1.0, 3), SLO, AutoscaleState(desired=3), ttft_p95_s=0.95)
    assert decision.signals["load"] == 1
    assert decision.desired == 3


def test_no_ttft_slo_means_no_ttft_signal() -> None:
    assert one(at_load(6.0, 3), BASE, ttft_p95_s=30.0).signals["ttft"] is None


@pytest.mark.parametrize(
    ("arrival_tps", "expected"),
    [
        pytest.param(2000.0, 4, id="needs-4"),
        pytest.param(1550.0, 3, id="within-tolerance"),
        pytest.param(450.0, 1, id="needs-1"),
        pytest.param(None, None, id="not-measured"),
    ],
)
def test_arrival_signal(arrival_tps: float | None, expected: int | None) -> None:
    config = BASE.model_copy(update={"replica_throughput_tps": 500.0})
    decision = one(at_load(6.0, 3), config, arrival_tps=arrival_tps)
    assert decision.signals["arrival"] == expected


def test_every_decision_has_a_reason_and_all_signals() -> None:
    decision = one(at_load(6.0, 2))
    assert decision.reason == "load 6.00/replica vs target 6 (ratio 1.00) within tolerance -> 2"
    assert list(decision.signals) == list(SIGNALS)


def test_observation_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="held"):
        Observation(now=0.0, current=1, held=-1)


# -- settings ----------------------------------------------------------------------------------


def test_settings_defaults_validate() -> None:
    settings = AutoscaleSettings()
    assert (settings.min_replicas, settings.max_replicas, settings.tolerance) == (1, 4, 0.1)
    assert settings.scale_down.stabilization_window_s == 60.0


def test_settings_reject_min_above_max() -> None:
    with pytest.raises(ValidationError, match="must not exceed"):
        AutoscaleSettings(min_replicas=5, max_replicas=2)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"max_replicas": 0}, id="max-zero"),
        pytest.param({"tolerance": 1.0}, id="tolerance"),
        pytest.param({"surprise": 1}, id="unknown-field"),
        pytest.param({"scale_up": {"policies": []}}, id="no-policies"),
        pytest.param(
            {"scale_up": {"policies": [{"kind": "nodes", "value": 1, "period_s": 1}]}},
            id="bad-kind",
        ),
    ],
)
def test_settings_reject(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AutoscaleSettings.model_validate(fields)


def test_fleet_file_carries_autoscale_with_partial_rules() -> None:
    spec = ModelSpec.model_validate(
        {
            "name": "m",
            "autoscale": {"min_replicas": 0, "max_replicas": 8, "scale_up": {"select": "min"}},
        }
    )
    assert spec.autoscale is not None
    assert (spec.autoscale.min_replicas, spec.autoscale.max_replicas) == (0, 8)
    assert spec.autoscale.scale_up.select == "min"
    assert spec.autoscale.scale_up.policies == BASE.scale_up.policies
    assert ModelSpec(name="m").autoscale is None
