"""Metric values kept as plain numbers on the request path and handed to prometheus_client in
batches (`flush`), before each scrape and every second.

prometheus_client takes a lock per update, and in multiprocess mode writes an mmap file per
update: a histogram observation costs ~1.3 us in-process and ~3 us with workers
(benchmarks/metrics_cost.py), and a 16-token stream makes 17 of them. Here an observation is
a bisect and two adds on Python numbers. That is safe because a gateway worker updates its
metrics from one thread, its event loop, which also runs the flushes (the scrape handler and
the periodic flush are coroutines in that loop, and the registry's own flusher runs in the
scrape's collect).

A flush writes into the histogram child's bucket values (`_buckets`, `_sum`), as
`observe()` itself does (its value objects since prometheus_client 0.1); a unit test checks
the samples equal what the same observations through `observe()` give.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector


class Timings:
    """One histogram child's observations since the last flush."""

    __slots__ = ("_bounds", "_child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)  # ascending, +Inf last
        self.counts = [0] * len(self._bounds)  # per bucket, not cumulative (as the child's)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self._bounds, seconds)] += 1  # the first bound >= seconds
        self.total += seconds

    def observe_zeros(self, n: int) -> None:
        """n observations of 0 s (events that arrived in one read): the lowest bucket."""
        self.counts[0] += n

    def flush(self) -> None:
        counts = self.counts
        buckets = self._child._buckets
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)
                counts[i] = 0
        if self.total:
            self._child._sum.inc(self.total)
            self.total = 0.0


class FlushFirst(Collector):
    """Registered in a registry before the metrics it flushes: whoever reads the registry
    (a scrape, a test's `get_sample_value`) sees every value counted so far."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Iterable[Metric]:
        self._flush()
        return ()
