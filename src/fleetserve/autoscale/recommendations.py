"""One recommendation per signal: how many replicas each signal asks for, and why.

Usage signals follow the HPA's replica calculator (pkg/controller/podautoscaler/
replica_calculator.go): a usage ratio against a per-replica target, a tolerance band around 1,
and replicas that report nothing (a ready replica missing the metric, a starting or unhealthy
one) counted as idle when scaling up and as exactly at target when scaling down. So a missing
metric never causes a scale-down, and a starting replica counts as capacity on its way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Float sums such as 0.1 * 3 must not round 3.0000000000000004 up to 4.
_EPSILON = 1e-9

LOAD = "load"
QUEUE = "queue"
KV_CACHE = "kv_cache"
TTFT = "ttft"
ARRIVAL = "arrival"
SIGNALS = (LOAD, QUEUE, KV_CACHE, TTFT, ARRIVAL)


@dataclass(frozen=True, slots=True)
class Recommendation:
    signal: str
    replicas: int | None
    """None: the signal was not measured, or it asks for nothing."""
    detail: str


def ceil_replicas(x: float) -> int:
    return max(0, math.ceil(x - _EPSILON))


def usage(
    signal: str,
    values: Sequence[float | None],
    *,
    target: float,
    baseline: int,
    unseen: int,
    tolerance: float,
    extra: float = 0.0,
    unit: str = "",
) -> Recommendation:
    """Replicas that bring the mean of `values` (one per ready replica) to `target`.

    `extra` is demand that no replica carries yet (requests held at the gateway); `unseen` the
    replicas in the fleet that cannot report (starting, unhealthy); `baseline` the count the
    policy holds at when there is no reason to move.
    """
    present = [v for v in values if v is not None]
    missing = len(values) - len(present)
    total = sum(present) + extra
    if not present:
        if extra <= 0:
            return Recommendation(signal, None, f"{signal}: no ready replica reports it")
        needed = ceil_replicas(extra / target)
        replicas = max(needed, baseline)
        return Recommendation(
            signal,
            replicas,
            f"{signal} {extra:.1f}{unit} with no ready replica vs target {target:g}/replica "
            f"-> {replicas}",
        )
    ratio = total / (target * len(present))
    said = (
        f"{signal} {total / len(present):.2f}{unit}/replica vs target {target:g} "
        f"(ratio {ratio:.2f})"
    )
    if abs(ratio - 1.0) <= tolerance:
        return Recommendation(signal, baseline, f"{said} within tolerance -> {baseline}")
    everyone = len(values) + unseen
    if ratio > 1.0:
        # Scaling up: replicas that report nothing count as idle, so capacity already starting
        # absorbs demand before more is asked for.
        new_ratio = total / (target * everyone)
        if new_ratio <= 1.0 + tolerance:
            return Recommendation(
                signal, baseline, f"{said}; {missing + unseen} not reporting cover it -> {baseline}"
            )
        replicas = max(ceil_replicas(total / target), baseline)
        return Recommendation(signal, replicas, f"{said} -> {replicas}")
    # Scaling down: replicas that report nothing count as exactly at target.
    padded = total + target * (missing + unseen)
    new_ratio = padded / (target * everyone)
    if new_ratio >= 1.0 - tolerance:
        return Recommendation(
            signal,
            baseline,
            f"{said}; {missing + unseen} not reporting held at target -> {baseline}",
        )
    replicas = min(ceil_replicas(padded / target), baseline)
    return Recommendation(signal, replicas, f"{said} -> {replicas}")


def queue(
    waiting: Sequence[float | None],
    *,
    held: int,
    target_queue: float,
    target_concurrency: float,
    baseline: int,
    unseen: int,
    tolerance: float,
) -> Recommendation:
    """Replicas that absorb the queue beyond `target_queue` per ready replica.

    Only pushes up: a short queue says nothing about how many replicas to keep. Unlike
    production-stack's or KEDA's `ceil(waiting / target)`, which starts a replica per
    `target_queue` waiting requests, the excess is spread over new replicas at
    `target_concurrency` each, because a new replica takes queued requests into its batch.
    Ready replicas not reporting a queue count as having none; starting ones absorb it first.
    """
    present = [w for w in waiting if w is not None]
    if not present and held <= 0:
        return Recommendation(QUEUE, None, "queue: no ready replica reports it")
    ready = len(waiting)
    total = sum(present) + held
    allowed = target_queue * ready
    said = f"queue {total:.0f} waiting or held vs {allowed:g} allowed on {ready} ready"
    if total <= allowed * (1.0 + tolerance):
        if total >= allowed * (1.0 - tolerance) and ready > 0:
            return Recommendation(QUEUE, baseline, f"{said} within tolerance -> {baseline}")
        return Recommendation(QUEUE, None, f"{said}: no demand")
    needed = ready + ceil_replicas((total - allowed) / target_concurrency)
    if needed <= ready + unseen:
        return Recommendation(
            QUEUE, baseline, f"{said}; {unseen} starting or unhealthy absorb it -> {baseline}"
        )
    replicas = max(needed, baseline)
    return Recommendation(QUEUE, replicas, f"{said} -> {replicas}")


def ttft(
    p95_s: float | None,
    slo_s: float | None,
    *,
    baseline: int,
    starting: int,
    settling: bool,
    tolerance: float,
) -> Recommendation:
    """One more replica while TTFT p95 is over the SLO; hold near it; nothing well under it.

    Not proportional: TTFT is not linear in replicas, and a p95 over a window lags the fleet.
    While replicas start, or soon after a scale-up (`settling`), it only holds.
    """
    if slo_s is None:
        return Recommendation(TTFT, None, "ttft: no SLO set")
    if p95_s is None:
        return Recommendation(TTFT, None, "ttft: not measured")
    said = f"TTFT p95 {p95_s:.2f}s vs SLO {slo_s:g}s"
    if p95_s > slo_s * (1.0 + tolerance):
        if starting > 0:
            return Recommendation(TTFT, baseline, f"{said}; {starting} starting -> {baseline}")
        if settling:
            return Recommendation(
                TTFT, baseline, f"{said}; settling after a scale-up -> {baseline}"
            )
        return Recommendation(TTFT, baseline + 1, f"{said} over -> {baseline + 1}")
    if p95_s >= slo_s * (1.0 - tolerance):
        return Recommendation(TTFT, baseline, f"{said} near the SLO -> hold {baseline}")
    return Recommendation(TTFT, None, f"{said} well under: no demand")


def arrival(
    arrival_tps: float | None,
    replica_tps: float | None,
    *,
    baseline: int,
    unseen: int,
    tolerance: float,
) -> Recommendation:
    """Replicas whose throughput carries the arrival rate (utilisation law, U = X / capacity).

    Scaling down, it never asks below the replicas that cannot report yet (as `usage` does).
    """
    if replica_tps is None:
        return Recommendation(ARRIVAL, None, "arrival: no replica throughput set")
    if arrival_tps is None:
        return Recommendation(ARRIVAL, None, "arrival: not measured")
    needed = arrival_tps / replica_tps
    said = f"arrivals {arrival_tps:.0f} tok/s over {replica_tps:g} tok/s/replica = {needed:.2f}"
    if baseline > 0 and abs(needed / baseline - 1.0) <= tolerance:
        return Recommendation(ARRIVAL, baseline, f"{said} within tolerance -> {baseline}")
    replicas = ceil_replicas(needed)
    if replicas < baseline:
        replicas = min(max(replicas, unseen), baseline)
    return Recommendation(ARRIVAL, replicas, f"{said} -> {replicas}")
