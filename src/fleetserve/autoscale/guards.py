"""The guards between a recommendation and a desired count, after the HPA's `behavior`.

Stabilization windows and step policies follow pkg/controller/podautoscaler/horizontal.go
(`stabilizeRecommendationWithBehaviors`, `calculateScaleUpLimitWithScalingRules`,
`calculateScaleDownLimitWithBehaviors`): pure functions of the recent history and `now`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from fleetserve.autoscale.decision import Direction, ScaleEvent, TimedRecommendation
from fleetserve.config import ScalingRules


def stabilize(
    recommendation: int,
    earlier: Sequence[TimedRecommendation],
    *,
    now: float,
    baseline: int,
    up_window_s: float,
    down_window_s: float,
) -> int:
    """Move from `baseline` only as far as every recommendation in the window agrees.

    Going up takes the lowest recommendation of the up window; going down the highest of the
    down window. `earlier` excludes `recommendation` itself, which always counts.
    """
    up = min([recommendation, *(r.replicas for r in earlier if r.at > now - up_window_s)])
    down = max([recommendation, *(r.replicas for r in earlier if r.at > now - down_window_s)])
    return min(max(baseline, up), down)


def _changed_within(events: Iterable[ScaleEvent], now: float, period_s: float) -> tuple[int, int]:
    """Replicas added and removed by the events in the last `period_s`."""
    recent = [e for e in events if e.at > now - period_s]
    added = sum(e.delta for e in recent if e.delta > 0)
    removed = sum(-e.delta for e in recent if e.delta < 0)
    return added, removed


def scale_up_limit(
    baseline: int, events: Sequence[ScaleEvent], rules: ScalingRules, *, now: float
) -> int:
    """The most replicas the scale-up policies allow now (never below `baseline`)."""
    if rules.select == "disabled":
        return baseline
    proposals = []
    for policy in rules.policies:
        added, removed = _changed_within(events, now, policy.period_s)
        start = baseline - added + removed
        if policy.kind == "pods":
            proposals.append(start + policy.value)
        else:
            # Rounded up, or a small fleet could never grow by a percentage (as the HPA does).
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
    limit = max(proposals) if rules.select == "max" else min(proposals)
    return max(limit, baseline)


def scale_down_limit(
    baseline: int, events: Sequence[ScaleEvent], rules: ScalingRules, *, now: float
) -> int:
    """The fewest replicas the scale-down policies allow now (never above `baseline`)."""
    if rules.select == "disabled":
        return baseline
    proposals = []
    for policy in rules.policies:
        added, removed = _changed_within(events, now, policy.period_s)
        start = baseline - added + removed
        if policy.kind == "pods":
            proposals.append(start - policy.value)
        else:
            proposals.append(int(start * (1 - policy.value / 100)))
    # "max" selects the policy allowing the largest change, which going down is the lowest count.
    limit = min(proposals) if rules.select == "max" else max(proposals)
    return min(max(limit, 0), baseline)


def flips(
    desired: int,
    baseline: int,
    *,
    last_direction: Direction | None,
    last_change_at: float | None,
    now: float,
    no_flip_s: float,
) -> bool:
    """Whether moving from `baseline` to `desired` reverses the last change within `no_flip_s`."""
    if desired == baseline or last_direction is None or last_change_at is None:
        return False
    direction = Direction.UP if desired > baseline else Direction.DOWN
    return direction != last_direction and now - last_change_at < no_flip_s


def recent(
    items: tuple[TimedRecommendation, ...], *, now: float, keep_s: float
) -> tuple[TimedRecommendation, ...]:
    return tuple(r for r in items if r.at > now - keep_s)


def recent_events(
    items: tuple[ScaleEvent, ...], *, now: float, keep_s: float
) -> tuple[ScaleEvent, ...]:
    return tuple(e for e in items if e.at > now - keep_s)
