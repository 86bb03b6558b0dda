"""What the live page's request trail costs the gateway per request, measured in-process.

The accounting step runs `if trail.on: trail.add(...)` once per request. Off (no page was
ever opened) that is one attribute check; on, one append to a bounded deque and three O(1)
writes to 1-s-bucket windows. Both are timed here side by side in one run on the same
Exchange objects, with `time.perf_counter_ns` over many calls (CPU of one core; the loop's own
cost is measured too and subtracted):

    .venv/bin/python -m benchmarks.dashboard_trail            # about 5 s
"""

from __future__ import annotations

import argparse
import platform
import time

from fleetserve.gateway.dashboard.trail import RequestTrail
from fleetserve.gateway.exchange import Exchange


def per_call_ns(
    trail: RequestTrail, exchanges: list[Exchange], ids: list[str], rounds: int
) -> float:
    """Nanoseconds per request of the accounting step's trail line (the loop's cost left in)."""
    start = time.perf_counter_ns()
    now = 1000.0
    for _ in range(rounds):
        for request_id, exchange in zip(ids, exchanges, strict=True):
            now += 0.001
            if trail.on:
                trail.add(request_id, exchange, 200, 0.5, now)
    return (time.perf_counter_ns() - start) / (rounds * len(exchanges))


def loop_ns(exchanges: list[Exchange], ids: list[str], rounds: int) -> float:
    start = time.perf_counter_ns()
    now = 1000.0
    for _ in range(rounds):
        for _id, _exchange in zip(ids, exchanges, strict=True):
            now += 0.001
    return (time.perf_counter_ns() - start) / (rounds * len(exchanges))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="passes over 1000 requests")
    args = parser.parse_args()
    exchanges = [
        Exchange(model="m", replica=f"r{i % 8}", ttft_s=0.05 + i % 7 * 0.01, attempts=1)
        for i in range(1000)
    ]
    ids = [f"fs-{i}" for i in range(len(exchanges))]  # the gateway has its id already
    off, on = RequestTrail(), RequestTrail()
    on.start(0.0)
    base = loop_ns(exchanges, ids, args.rounds)
    off_ns = per_call_ns(off, exchanges, ids, args.rounds) - base
    on_ns = per_call_ns(on, exchanges, ids, args.rounds) - base
    print(
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{args.rounds * len(exchanges)} requests per case"
    )
    print(f"trail off (no page opened): {max(off_ns, 0.0):8.1f} ns per request")
    print(f"trail on  (page opened):    {on_ns:8.1f} ns per request")


if __name__ == "__main__":
    main()
