"""The autoscaling policy: `decide(observation, state, config) -> (Decision, state)`, pure.

Small steps, as Ray Serve's policy is built (`_apply_scaling_factors -> _apply_bounds ->
_apply_delay_logic`), with the HPA's guards:

1. one recommendation per signal (`recommendations`): load, queue, KV cache, TTFT, arrivals;
   the largest wins, and a signal that is not measured asks for nothing;
2. wake-up: requests held with no replica ready or starting get a replica at once, past the
   windows (KEDA's activation; the gateway holds requests meanwhile);
3. scale to zero when `min_replicas` is 0 and the fleet has been idle `scale_to_zero_after_s`;
4. otherwise stabilization windows, step policies and no direction flip (`guards`);
5. bounds: `max_replicas`, and `min_replicas` (at least 1 while awake and not idle long enough).

The policy's reference point is the count it last asked for, not the actuator's report, so a
replica that crashes (the report drops) is replaced without counting as a scale-up.
No I/O and no clock: `now` comes in the observation; the state comes back out.
"""

from __future__ import annotations

from fleetserve.autoscale import guards, recommendations
from fleetserve.autoscale.decision import (
    AutoscaleState,
    Decision,
    Direction,
    ScaleEvent,
    TimedRecommendation,
)
from fleetserve.autoscale.observation import Observation, ReplicaLoad
from fleetserve.autoscale.recommendations import SIGNALS, Recommendation
from fleetserve.config import AutoscaleSettings

__all__ = [
    "SIGNALS",
    "AutoscaleSettings",
    "AutoscaleState",
    "Decision",
    "Direction",
    "Observation",
    "Recommendation",
    "ReplicaLoad",
    "decide",
    "recommend",
]


def recommend(
    observation: Observation, state: AutoscaleState, config: AutoscaleSettings, baseline: int
) -> list[Recommendation]:
    """Each signal's recommendation, in `SIGNALS` order."""
    obs = observation
    loads = obs.ready_loads
    unseen = obs.starting + obs.unhealthy
    settling = (
        state.last_direction is Direction.UP
        and state.last_change_at is not None
        and obs.now - state.last_change_at < config.ttft_window_s
    )
    return [
        recommendations.usage(
            recommendations.LOAD,
            [load.concurrency for load in loads],
            target=config.target_concurrency,
            extra=obs.held,
            baseline=baseline,
            unseen=unseen,
            tolerance=config.tolerance,
        ),
        recommendations.queue(
            [load.waiting for load in loads],
            held=obs.held,
            target_queue=config.target_queue,
            target_concurrency=config.target_concurrency,
            baseline=baseline,
            unseen=unseen,
            tolerance=config.tolerance,
        ),
        recommendations.usage(
            recommendations.KV_CACHE,
            [load.kv_usage_frac for load in loads],
            target=config.target_kv_usage_frac,
            baseline=baseline,
            unseen=unseen,
            tolerance=config.tolerance,
        ),
        recommendations.ttft(
            obs.ttft_p95_s,
            config.ttft_slo_s,
            baseline=baseline,
            starting=obs.starting,
            settling=settling,
            tolerance=config.tolerance,
        ),
        recommendations.arrival(
            obs.arrival_tps,
            config.replica_throughput_tps,
            baseline=baseline,
            unseen=unseen,
            tolerance=config.tolerance,
        ),
    ]


def decide(
    observation: Observation, state: AutoscaleState, config: AutoscaleSettings
) -> tuple[Decision, AutoscaleState]:
    """The replicas to run now, why, and the state for the next call."""
    obs, now = observation, observation.now
    baseline = state.desired if state.desired is not None else obs.current
    recs = recommend(obs, state, config, baseline)
    present = [r for r in recs if r.replicas is not None]
    if present:
        top = max(present, key=lambda r: r.replicas or 0)
        recommendation = top.replicas or 0
        steps = [top.detail]
    else:
        recommendation = baseline
        steps = [f"no signal measured: hold at {baseline}"]

    idle_since = (state.idle_since if state.idle_since is not None else now) if obs.idle else None
    idle_for_s = now - idle_since if idle_since is not None else 0.0
    idle_long = (
        config.min_replicas == 0
        and idle_since is not None
        and idle_for_s >= config.scale_to_zero_after_s
    )
    wake = obs.held > 0 and obs.ready + obs.starting == 0

    if wake:
        limit = guards.scale_up_limit(baseline, state.events, config.scale_up, now=now)
        desired = max(1, min(max(recommendation, 1), limit))
        steps.append(f"wake-up: {obs.held} held with no replica ready or starting -> {desired}")
    elif idle_long and baseline > 0:
        desired = 0
        steps.append(
            f"idle {idle_for_s:.0f}s (no arrivals, nothing in flight or held) -> scale to zero"
        )
    else:
        desired = _guarded(recommendation, baseline, state, config, now, steps)

    desired = _bounded(desired, baseline, config, idle_long=idle_long, steps=steps)
    if obs.current < baseline <= desired:
        steps.append(f"replacing {baseline - obs.current} lost (actuator reports {obs.current})")

    delta = desired - baseline
    keep_recs_s = max(
        config.scale_up.stabilization_window_s, config.scale_down.stabilization_window_s
    )
    keep_events_s = max(
        p.period_s for p in (*config.scale_up.policies, *config.scale_down.policies)
    )
    changed = Direction.UP if delta > 0 else Direction.DOWN if delta < 0 else None
    new_state = AutoscaleState(
        recommendations=guards.recent(
            (*state.recommendations, TimedRecommendation(now, recommendation)),
            now=now,
            keep_s=keep_recs_s,
        ),
        events=guards.recent_events(
            (*state.events, *((ScaleEvent(now, delta),) if delta else ())),
            now=now,
            keep_s=keep_events_s,
        ),
        desired=desired,
        last_direction=changed or state.last_direction,
        last_change_at=now if changed else state.last_change_at,
        idle_since=idle_since,
    )
    direction = (
        Direction.UP
        if desired > obs.current
        else Direction.DOWN
        if desired < obs.current
        else Direction.HOLD
    )
    decision = Decision(
        at=now,
        desired=desired,
        current=obs.current,
        direction=direction,
        recommendation=recommendation,
        reason="; ".join(steps),
        signals={r.signal: r.replicas for r in recs},
    )
    return decision, new_state


def _guarded(
    recommendation: int,
    baseline: int,
    state: AutoscaleState,
    config: AutoscaleSettings,
    now: float,
    steps: list[str],
) -> int:
    """Stabilization windows, then step policies, then no flip."""
    desired = guards.stabilize(
        recommendation,
        state.recommendations,
        now=now,
        baseline=baseline,
        up_window_s=config.scale_up.stabilization_window_s,
        down_window_s=config.scale_down.stabilization_window_s,
    )
    if desired != recommendation:
        if recommendation > baseline:
            window = f"lowest of the last {config.scale_up.stabilization_window_s:g}s"
        else:
            window = f"highest of the last {config.scale_down.stabilization_window_s:g}s"
        steps.append(f"stabilized to {desired} ({window})")
    if desired > baseline:
        limit = guards.scale_up_limit(baseline, state.events, config.scale_up, now=now)
        if desired > limit:
            steps.append(f"capped to +{limit - baseline} by the scale-up policy -> {limit}")
            desired = limit
    elif desired < baseline:
        limit = guards.scale_down_limit(baseline, state.events, config.scale_down, now=now)
        if desired < limit:
            steps.append(f"capped to -{baseline - limit} by the scale-down policy -> {limit}")
            desired = limit
    if guards.flips(
        desired,
        baseline,
        last_direction=state.last_direction,
        last_change_at=state.last_change_at,
        now=now,
        no_flip_s=config.no_flip_s,
    ):
        steps.append(
            f"no flip within {config.no_flip_s:g}s of the last {state.last_direction} "
            f"-> hold {baseline}"
        )
        desired = baseline
    return desired


def _bounded(
    desired: int, baseline: int, config: AutoscaleSettings, *, idle_long: bool, steps: list[str]
) -> int:
    """Clamp to [floor, max_replicas]; with min 0, the floor is 1 while awake and not idle long."""
    if desired > config.max_replicas:
        steps.append(f"capped at max_replicas {config.max_replicas}")
        return config.max_replicas
    if config.min_replicas > 0:
        if desired < config.min_replicas:
            steps.append(f"raised to min_replicas {config.min_replicas}")
            return config.min_replicas
        return desired
    if desired == 0 and baseline > 0 and not idle_long:
        steps.append(f"kept at 1 until idle for {config.scale_to_zero_after_s:g}s")
        return 1
    return desired
