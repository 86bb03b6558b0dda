"""Replica pickers: pure choices over snapshots, called once per request on the hot path.

Every picker skips replicas named in `request.exclude` (a retry must go elsewhere) and
replicas at their concurrency cap (`has_capacity` is False), and returns None when none
is left. No clock, no I/O. Their state (a cursor, an RNG, a cache keyed by replica ids)
is per instance: one instance per model per gateway process, called from its event loop
(not thread-safe). A pick is at most O(n) with no per-request sort: 1-4 us for 16 replicas.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from math import ceil
from sys import maxsize
from typing import assert_never

from fleetserve.config import PickerName
from fleetserve.routing.affinity import DEFAULT_VNODES, HashRing, key_hash
from fleetserve.routing.picker import Picker
from fleetserve.routing.snapshot import ReplicaSnapshot, RouteRequest

DEFAULT_LOAD_FACTOR = 1.25


def _eligible(request: RouteRequest, replicas: Sequence[ReplicaSnapshot]) -> list[ReplicaSnapshot]:
    exclude = request.exclude
    if exclude:
        return [r for r in replicas if r.has_capacity and r.id not in exclude]
    return [r for r in replicas if r.has_capacity]


class RoundRobin:
    """Rotates over replicas in id order, resuming after the last replica it chose.

    The cursor is the last chosen *id*, not an index, so the rotation survives the list
    changing: a replica that joins takes its turn at its place in id order, and when the
    last chosen one leaves, the rotation resumes where it would have been. (A bare
    counter mod n skips or repeats replicas whenever n changes; vLLM production-stack's
    round robin sorts the endpoints per request to get a stable order, which we cache.)
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._ids: tuple[str, ...] = ()
        self._sorted_ids: list[str] = []
        self._order: list[int] = []  # positions in the caller's list, in id order
        self._last = ""

    def pick(
        self, request: RouteRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> ReplicaSnapshot | None:
        ids = tuple([r.id for r in replicas])
        if ids != self._ids:
            self._order = sorted(range(len(ids)), key=ids.__getitem__)
            self._sorted_ids = [ids[i] for i in self._order]
            self._ids = ids
        n = len(ids)
        start = bisect_right(self._sorted_ids, self._last)
        exclude = request.exclude
        order = self._order
        for step in range(n):
            j = start + step
            replica = replicas[order[j if j < n else j - n]]
            if replica.has_capacity and replica.id not in exclude:
                self._last = replica.id
                return replica
        return None


class LeastOutstanding:
    """Fewest requests in flight from this gateway; exact and current, unlike engine metrics.

    Ties go to the first least-loaded replica found scanning from just after the last
    pick, so tied replicas take turns (as nginx's least_conn does with round robin)
    instead of the first in the list taking every tie, which at low load is every request.
    """

    name = "least_outstanding"

    def __init__(self) -> None:
        self._next = 0  # where the scan starts: one past the last pick's position

    def pick(
        self, request: RouteRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> ReplicaSnapshot | None:
        n = len(replicas)
        if n == 0:
            return None
        start = self._next % n
        exclude = request.exclude
        best = -1
        best_load = maxsize
        for step in range(n):
            j = start + step
            if j >= n:
                j -= n
            replica = replicas[j]
            load = replica.in_flight
            if load < best_load and replica.has_capacity and replica.id not in exclude:
                best, best_load = j, load
        if best < 0:
            return None
        self._next = best + 1
        return replicas[best]


class PowerOfTwoChoices:
    """Two distinct replicas at random; the one with the lower load score wins.

    Why two random choices rather than the least loaded of all: with two choices the
    maximum load falls from Theta(log n / log log n) to Theta(log log n) (Mitzenmacher,
    "The Power of Two Choices in Randomized Load Balancing", IEEE TPDS 12(10), 2001), and,
    what matters here, it stays good when load information is stale, where "pick the
    global least" sends every request in an update period to the same replica
    (Mitzenmacher, "How Useful Is Old Information?", IEEE TPDS 11(1), 2000).

    Load score, in units of requests::

        score = in_flight
              + waiting_weight * waiting               (engine queue)
              + running_weight * running               (engine batch)
              + kv_weight * max(0, kv_usage_frac - kv_knee_frac) / (1 - kv_knee_frac)

    - `in_flight` (weight 1) is exact and current: this gateway counts a request the
      moment it is sent. Engine signals are scraped about once a second, so at thousands
      of requests per second they miss everything routed since the scrape; `in_flight` is
      what keeps back-to-back picks from piling onto a replica that looked idle a second
      ago. It only counts this gateway process, though.
    - `waiting` and `running` see everything the engine serves, including requests from
      other gateway workers and other gateways, but late. A queued request means the
      engine is saturated (sequence or KV limit) and a new request will queue behind it,
      so `waiting` counts fully; running requests share the batch and slow decode but do
      not block admission, and this gateway's share of them is already in `in_flight`, so
      `running` counts half.
    - KV cache use past `kv_knee_frac` means vLLM is about to queue or preempt; the
      penalty ramps to `kv_weight` requests at a full cache, a sign that shows up before
      `waiting` does.
    - A signal the engine did not report (None: not scraped yet, or an engine that does
      not export it) adds nothing, so a replica without signals is scored by `in_flight`
      alone, which for a fresh replica is the truth.

    Peers: the SGLang-derived vllm-project/router `power_of_two` compares one load number
    (the router's own in-flight counter, or a polled engine load plus that counter, "to
    avoid thundering herd when cached loads go stale"); llm-d / Gateway API Inference
    Extension score pods by weighted sums of scorers: queue depth (min-max normalised
    `num_requests_waiting`) and `1 - kv_cache_usage`; vLLM production-stack falls back
    from session affinity by `num_queuing_requests`. This score keeps their signals (queue,
    KV) and adds the exact in-flight count they lack or treat as a fallback.
    """

    name = "p2c"

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        waiting_weight: float = 1.0,
        running_weight: float = 0.5,
        kv_weight: float = 4.0,
        kv_knee_frac: float = 0.8,
    ) -> None:
        if not 0.0 <= kv_knee_frac < 1.0:
            raise ValueError(f"kv_knee_frac must be in [0, 1), got {kv_knee_frac}")
        self._rng = rng if rng is not None else random.Random()
        self._waiting_weight = waiting_weight
        self._running_weight = running_weight
        self._kv_knee_frac = kv_knee_frac
        self._kv_scale = kv_weight / (1.0 - kv_knee_frac)

    def load_score(self, replica: ReplicaSnapshot) -> float:
        """Lower is lighter; see the class docstring for the terms and their weights."""
        score = float(replica.in_flight)
        signals = replica.signals
        if signals.waiting is not None:
            score += self._waiting_weight * signals.waiting
        if signals.running is not None:
            score += self._running_weight * signals.running
        kv = signals.kv_usage_frac
        if kv is not None and kv > self._kv_knee_frac:
            score += self._kv_scale * (min(kv, 1.0) - self._kv_knee_frac)
        return score

    def pick(
        self, request: RouteRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> ReplicaSnapshot | None:
        # Fast path: draw from the whole list and keep the pair if both may serve, which
        # is the usual case. Otherwise draw again among the eligible ones; either way the
        # pair is uniform over eligible pairs, and the common case costs O(1), not O(n).
        if len(replicas) >= 2:
            a, b = self._pair(replicas)
            exclude = request.exclude
            if (
                a.has_capacity
                and b.has_capacity
                and (not exclude or (a.id not in exclude and b.id not in exclude))
            ):
                return self._lighter(a, b)
        candidates = _eligible(request, replicas)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        return self._lighter(*self._pair(candidates))

    def _pair(self, replicas: Sequence[ReplicaSnapshot]) -> tuple[ReplicaSnapshot, ReplicaSnapshot]:
        # int(random() * n) rather than randrange: a third of the cost, and the bias for
        # n far below 2**53 is nil. Drawing the second from n - 1 and stepping over the
        # first makes the pair distinct without a retry loop.
        n = len(replicas)
        draw = self._rng.random
        i = int(draw() * n)
        j = int(draw() * (n - 1))
        if j >= i:
            j += 1
        return replicas[i], replicas[j]

    def _lighter(self, a: ReplicaSnapshot, b: ReplicaSnapshot) -> ReplicaSnapshot:
        return a if self.load_score(a) <= self.load_score(b) else b


class PrefixAffinity:
    """Same prefix, same replica (so its prefix cache hits), within a bound on load.

    Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent
    Hashing with Bounded Loads", SODA 2018): walk the ring clockwise from the key's hash
    to the first replica whose load *after* taking this request stays within
    ceil(load_factor * (total_in_flight + 1) / n), the "+1" being this request. One hot
    prefix therefore fills its home replica up to load_factor times the mean and then
    spills to the next replica on the ring (the same one for every request of that
    prefix, so the spill replica's cache warms too), and returns home as load drains.
    A bound always exists: not every replica can be above the mean.

    vLLM production-stack's session router hashes sessions onto a ring with no load bound
    (a hot session can swamp its replica); its cache-aware variant leaves the home only
    past a fixed queue threshold. The bound here scales with fleet load instead.

    The ring depends only on the set of replica ids and is rebuilt when that set changes;
    a cheap tuple compare of ids per pick detects it. Requests without a prefix key go to
    the least outstanding replica.
    """

    name = "prefix_affinity"

    def __init__(
        self, load_factor: float = DEFAULT_LOAD_FACTOR, *, vnodes: int = DEFAULT_VNODES
    ) -> None:
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be at least 1.0, got {load_factor}")
        self.load_factor = load_factor
        self._vnodes = vnodes
        self._ids: tuple[str, ...] = ()
        self._position: dict[str, int] = {}
        self._ring = HashRing((), vnodes)
        self._fallback = LeastOutstanding()

    def pick(
        self, request: RouteRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> ReplicaSnapshot | None:
        if not request.prefix_key or not replicas:
            return self._fallback.pick(request, replicas)
        ids = tuple([r.id for r in replicas])
        if ids != self._ids:
            self._reindex(ids)
        total = 0
        for replica in replicas:
            total += replica.in_flight
        bound = ceil(self.load_factor * (total + 1) / len(replicas))
        exclude = request.exclude
        position = self._position
        for rid in self._ring.walk(key_hash(request.prefix_key)):
            replica = replicas[position[rid]]
            if replica.in_flight < bound and replica.has_capacity and rid not in exclude:
                return replica
        # Every replica within the bound is excluded or at its cap: balance what is left.
        return self._fallback.pick(request, replicas)

    def _reindex(self, ids: tuple[str, ...]) -> None:
        # A reorder of the same replicas needs new positions but not a new ring.
        self._position = {rid: i for i, rid in enumerate(ids)}
        if self._position.keys() != self._ring.ids:
            self._ring = HashRing(ids, self._vnodes)
        self._ids = ids


def make_picker(
    name: PickerName,
    *,
    load_factor: float = DEFAULT_LOAD_FACTOR,
    rng: random.Random | None = None,
) -> Picker:
    """The picker a model's fleet-file entry names; one instance per model."""
    match name:
        case "round_robin":
            return RoundRobin()
        case "least_outstanding":
            return LeastOutstanding()
        case "p2c":
            return PowerOfTwoChoices(rng)
        case "prefix_affinity":
            return PrefixAffinity(load_factor)
        case _:
            assert_never(name)
