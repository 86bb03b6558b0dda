"""Results over time: one bucket per second of the run, lined up with the fleet's samples.

Second k holds [k, k + 1) seconds from the run's start:

- `sent` counts requests by their intended send time (the schedule's shape);
- `completed`, `errors`, TTFT and e2e percentiles go by the second the request ended;
- output tokens go by the second their chunks arrived (a request's tokens spread evenly over
  its chunks; without chunk times, all at its end), so throughput follows the stream;
- ITL p95 goes by the second each gap ended;
- `in_flight_mean` is the time-weighted mean of requests between send and end;
- the fleet fields hold each field's last known value at the end of the second.
Only successful requests contribute tokens and latencies, as in the totals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fleetserve.bench.records import FleetSample, RequestRecord
from fleetserve.bench.report.model import SecondBucket
from fleetserve.bench.samples import request_times
from fleetserve.telemetry.quantiles import percentile_of


@dataclass(slots=True)
class _Acc:
    sent: int = 0
    completed: int = 0
    errors: int = 0
    output_tokens: float = 0.0
    in_flight_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)


def per_second(
    records: Sequence[RequestRecord], window_s: float, fleet: Sequence[FleetSample] = ()
) -> list[SecondBucket]:
    """Bucket a run into seconds 0 .. ceil(window_s) - 1 (times past the window go last)."""
    count = max(1, math.ceil(window_s))
    acc = [_Acc() for _ in range(count)]

    def slot(t_s: float) -> int:
        return min(max(math.floor(t_s), 0), count - 1)

    for record in records:
        acc[slot(record.intended_s)].sent += 1
        _add_in_flight(acc, record.sent_s, record.end_s)
        end = acc[slot(record.end_s)]
        if not record.ok:
            end.errors += 1
            continue
        end.completed += 1
        times = request_times(record)
        end.e2e_s.append(times.e2e_s)
        if times.ttft_s is not None:
            end.ttft_s.append(times.ttft_s)
        for gap, t_s in zip(times.itl_s, record.token_times_s[1:], strict=True):
            acc[slot(t_s)].itl_s.append(gap)
        tokens = record.output_tokens or 0
        if tokens and record.token_times_s:
            share = tokens / len(record.token_times_s)
            for t_s in record.token_times_s:
                acc[slot(t_s)].output_tokens += share
        else:
            end.output_tokens += tokens
    fleet_at = _fleet_by_second(fleet, count)
    return [
        SecondBucket(
            t_s=k,
            sent=a.sent,
            completed=a.completed,
            errors=a.errors,
            output_tps=a.output_tokens,
            ttft_p50_s=percentile_of(a.ttft_s, 50),
            ttft_p95_s=percentile_of(a.ttft_s, 95),
            e2e_p50_s=percentile_of(a.e2e_s, 50),
            e2e_p95_s=percentile_of(a.e2e_s, 95),
            itl_p95_s=percentile_of(a.itl_s, 95),
            in_flight_mean=a.in_flight_s,
            replicas_ready=fleet_at[k][0],
            replicas_desired=fleet_at[k][1],
            queue_depth=fleet_at[k][2],
        )
        for k, a in enumerate(acc)
    ]


def _add_in_flight(acc: list[_Acc], start_s: float, end_s: float) -> None:
    """Add the request's overlap with each second: summed, it is the mean in flight."""
    if end_s <= start_s:
        return
    first = max(math.floor(start_s), 0)
    last = min(math.ceil(end_s), len(acc))
    for k in range(first, last):
        overlap = min(end_s, k + 1) - max(start_s, k)
        if overlap > 0:
            acc[k].in_flight_s += overlap


_Fleet = tuple[int | None, int | None, int | None]


def _fleet_by_second(fleet: Sequence[FleetSample], count: int) -> list[_Fleet]:
    """Ready, desired and queue depth at the end of each second, last known value carried."""
    ordered = sorted(fleet, key=lambda sample: sample.t_s)
    ready: int | None = None
    desired: int | None = None
    queue: int | None = None
    out: list[_Fleet] = []
    i = 0
    for k in range(count):
        while i < len(ordered) and ordered[i].t_s < k + 1:
            sample = ordered[i]
            ready = sample.replicas_ready if sample.replicas_ready is not None else ready
            desired = sample.replicas_desired if sample.replicas_desired is not None else desired
            queue = sample.queue_depth if sample.queue_depth is not None else queue
            i += 1
        out.append((ready, desired, queue))
    return out
