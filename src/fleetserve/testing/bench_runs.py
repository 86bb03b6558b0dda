"""A synthetic bench run: records and fleet samples of a spike the autoscaler answers.

For tests and demos of bench's stats and report (no server involved). Deterministic for a
given seed. The story: 4 req/s, a spike to 16 req/s from 20 s to 35 s, two replicas that grow
to five with a start-up delay; TTFT climbs while the fleet is short, a few requests are
refused (503) before the new replicas are ready, and a few time out.
"""

from __future__ import annotations

import random

from fleetserve.bench.records import FleetSample, RequestRecord

DURATION_S = 60.0
CAPACITY_RPS_PER_REPLICA = 3.5


def _rate_rps(t_s: float) -> float:
    return 16.0 if 20.0 <= t_s < 35.0 else 4.0


def _desired(t_s: float) -> int:
    if t_s < 22.0:
        return 2
    if t_s < 45.0:
        return 5
    return 3 if t_s < 52.0 else 2


def _ready(t_s: float) -> int:
    # New replicas take 8 s to start; scale-down is immediate.
    if t_s < 30.0:
        return 2
    return _desired(t_s)


def synthetic_run(
    seed: int = 7, duration_s: float = DURATION_S
) -> tuple[list[RequestRecord], list[FleetSample]]:
    """Records (in send order) and fleet samples (every 0.5 s) of the spike story."""
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    t = 0.0
    while t < duration_s:
        records.append(_request(rng, len(records), t))
        t += 1.0 / _rate_rps(t)
    fleet = [
        FleetSample(
            t_s=k * 0.5,
            replicas_ready=_ready(k * 0.5),
            replicas_desired=_desired(k * 0.5),
            replicas_starting=_desired(k * 0.5) - _ready(k * 0.5),
            replicas_draining=0,
            in_flight=None,
            queue_depth=max(0, round((_rate_rps(k * 0.5) - _capacity(k * 0.5)) * 4)),
        )
        for k in range(int(duration_s * 2))
    ]
    return records, fleet


def _capacity(t_s: float) -> float:
    return _ready(t_s) * CAPACITY_RPS_PER_REPLICA


def _request(rng: random.Random, index: int, intended_s: float) -> RequestRecord:
    lag_s = rng.expovariate(1 / 0.0004)
    sent_s = intended_s + lag_s
    overload = max(0.0, _rate_rps(intended_s) / _capacity(intended_s) - 1)
    if overload > 0.5 and rng.random() < 0.12:
        return RequestRecord(
            index=index, intended_s=intended_s, sent_s=sent_s, end_s=sent_s + 0.004,
            stream=True, status=503, error_kind="http_5xx", error="no replica ready (503)",
        )  # fmt: skip
    if rng.random() < 0.004:
        return RequestRecord(
            index=index, intended_s=intended_s, sent_s=sent_s, end_s=sent_s + 5.0,
            stream=True, status=200, error_kind="timeout", error="no first token within 5 s",
        )  # fmt: skip
    ttft_s = 0.06 + rng.lognormvariate(-3.2, 0.4) + overload * rng.uniform(0.4, 1.2)
    step_s = 0.018 * (1 + 0.6 * overload)
    tokens = rng.randint(32, 160)
    times = [sent_s + ttft_s]
    for _ in range(tokens - 1):
        times.append(times[-1] + step_s * rng.lognormvariate(0, 0.25))
    return RequestRecord(
        index=index,
        intended_s=intended_s,
        sent_s=sent_s,
        end_s=times[-1] + 0.001,
        stream=True,
        first_token_s=times[0],
        token_times_s=times,
        prompt_tokens=rng.randint(200, 800),
        output_tokens=tokens,
        tokens_from_usage=True,
        status=200,
    )
