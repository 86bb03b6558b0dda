"""The counters behind tenant limits, exact and in one process: the semantics the Redis
scripts keep across gateway replicas (one atomic step each, on the server's clock there).

- `RequestLog`: requests per minute as a true sliding window, a log of admission times:
  every window of `window_s` holds at most `limit` admissions, and a rejection records
  nothing. (GCRA would admit `limit + 1` in some windows; a two-window counter is approximate.)
- `TokenLog`: tokens per minute, reserved at admission (prompt + max_tokens) and settled to
  what was used; the window's sum of reservations never passes `limit`.
- `Leases`: concurrent requests as leases that expire unless renewed, so a gateway that dies
  cannot keep its slots.
- `Budget`: money in integer micro-dollars, the worst case reserved at admission and settled
  to the real cost: spend plus reservations never pass the budget. A reservation that is
  never settled (its gateway died) expires into spend at its worst case.

`now` always comes in; no clock is read here.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

MICRO_USD = 1_000_000  # micro-dollars in a dollar


@dataclass(frozen=True, slots=True)
class Verdict:
    """An admission's answer, with what OpenAI's `x-ratelimit-*` headers report."""

    admitted: bool
    limit: int
    remaining: int  # after this admission (or, refused, as it stands)
    reset_s: float  # until the window has room for one more (0 when it has room now)


class RequestLog:
    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError(f"need limit >= 1 and window_s > 0, got {limit=} {window_s=}")
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._ids: deque[str | None] = deque()  # beside _times: who was admitted then
        self._live: set[str] = set()

    def _expire(self, now: float) -> None:
        times = self._times
        while times and times[0] <= now - self.window_s:
            times.popleft()
            if (gone := self._ids.popleft()) is not None:
                self._live.discard(gone)

    def admit(self, now: float, request_id: str | None = None) -> Verdict:
        self._expire(now)
        times = self._times
        if len(times) >= self.limit:
            return Verdict(False, self.limit, 0, times[0] + self.window_s - now)
        times.append(now)
        self._ids.append(request_id)
        if request_id is not None:
            self._live.add(request_id)
        remaining = self.limit - len(times)
        reset_s = 0.0 if remaining else times[0] + self.window_s - now
        return Verdict(True, self.limit, remaining, reset_s)

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self._times)

    def oldest(self, now: float) -> float | None:
        """When the oldest admission still in the window was made (None: the window is empty)."""
        self._expire(now)
        return self._times[0] if self._times else None

    def holds(self, request_id: str, now: float) -> bool:
        """Whether `request_id` was admitted within the window."""
        self._expire(now)
        return request_id in self._live


class TokenLog:
    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError(f"need limit >= 1 and window_s > 0, got {limit=} {window_s=}")
        self.limit = limit
        self.window_s = window_s
        self._entries: OrderedDict[str, tuple[float, int]] = OrderedDict()  # id -> (at, tokens)
        self._sum = 0

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            rid, (at, tokens) = next(iter(entries.items()))
            if at > now - self.window_s:
                break
            del entries[rid]
            self._sum -= tokens

    def reserve(self, request_id: str, tokens: int, now: float) -> Verdict:
        """Reserve `tokens` for a request; refused (nothing recorded) if they do not fit."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, not {tokens}")
        if request_id in self._entries:
            raise ValueError(f"request {request_id!r} already holds a reservation")
        self._expire(now)
        if self._sum + tokens > self.limit:
            return Verdict(False, self.limit, self.limit - self._sum, self.room_at(tokens, now))
        self._entries[request_id] = (now, tokens)
        self._sum += tokens
        return Verdict(True, self.limit, self.limit - self._sum, 0.0)

    def settle(self, request_id: str, used: int, now: float) -> None:
        """The request used `used` tokens: its reservation becomes that (once expired, it no
        longer counts either way)."""
        self._expire(now)
        entry = self._entries.get(request_id)
        if entry is None:
            return
        at, reserved = entry
        self._entries[request_id] = (at, used)
        self._sum += used - reserved

    def used(self, now: float) -> int:
        self._expire(now)
        return self._sum

    def holds(self, request_id: str) -> bool:
        return request_id in self._entries

    def room_at(self, tokens: int, now: float) -> float:
        """Seconds until enough reservations leave the window for `tokens` more."""
        self._expire(now)
        if tokens > self.limit:
            return self.window_s  # never fits; say the whole window
        needed = self._sum + tokens - self.limit
        for at, held in self._entries.values():
            needed -= held
            if needed <= 0:
                return at + self.window_s - now
        return 0.0


class Leases:
    def __init__(self, limit: int, ttl_s: float) -> None:
        if limit < 1 or ttl_s <= 0:
            raise ValueError(f"need limit >= 1 and ttl_s > 0, got {limit=} {ttl_s=}")
        self.limit = limit
        self.ttl_s = ttl_s
        self._until: dict[str, float] = {}

    def _expire(self, now: float) -> None:
        for lease, until in list(self._until.items()):
            if until <= now:
                del self._until[lease]

    def acquire(self, lease_id: str, now: float) -> Verdict:
        self._expire(now)
        if lease_id in self._until:
            raise ValueError(f"lease {lease_id!r} is already held")
        if len(self._until) >= self.limit:
            soonest = min(self._until.values())
            return Verdict(False, self.limit, 0, soonest - now)
        self._until[lease_id] = now + self.ttl_s
        return Verdict(True, self.limit, self.limit - len(self._until), 0.0)

    def renew(self, lease_id: str, now: float) -> bool:
        """Keep a lease for another `ttl_s`; False if it had expired (and so was lost)."""
        self._expire(now)
        if lease_id not in self._until:
            return False
        self._until[lease_id] = now + self.ttl_s
        return True

    def release(self, lease_id: str) -> None:
        self._until.pop(lease_id, None)

    def held(self, now: float) -> int:
        self._expire(now)
        return len(self._until)

    def holds(self, lease_id: str) -> bool:
        return lease_id in self._until

    def soonest(self, now: float) -> float | None:
        """When the first lease held expires (None: none is held)."""
        self._expire(now)
        return min(self._until.values()) if self._until else None


class Budget:
    """Spent plus reserved never passes `limit`. A reservation may carry an expiry: a request
    whose gateway died never settles, so once its reservation expires (`expire`) it counts as
    spent at its worst case, which frees nothing it might have used (never an overshoot)."""

    def __init__(self, limit_micro_usd: int, spent_micro_usd: int = 0) -> None:
        if limit_micro_usd < 0:
            raise ValueError(f"a budget cannot be negative: {limit_micro_usd}")
        self.limit = limit_micro_usd
        self.spent = spent_micro_usd
        self._reserved: dict[str, tuple[int, float | None]] = {}  # id -> (amount, expires at)
        self._held = 0  # the sum of the amounts reserved
        self._soonest: float | None = None  # no reservation expires before this

    @property
    def reserved(self) -> int:
        return self._held

    @property
    def committed(self) -> int:
        """Spent plus reserved: what admission checks against the limit."""
        return self.spent + self._held

    def reserve(
        self, request_id: str, worst_micro_usd: int, expires_at: float | None = None
    ) -> Verdict:
        if worst_micro_usd < 0:
            raise ValueError(f"a cost cannot be negative: {worst_micro_usd}")
        if request_id in self._reserved:
            raise ValueError(f"request {request_id!r} already holds a reservation")
        left = self.limit - self.committed
        if worst_micro_usd > left:
            return Verdict(False, self.limit, left, 0.0)
        self._reserved[request_id] = (worst_micro_usd, expires_at)
        self._held += worst_micro_usd
        if expires_at is not None and (self._soonest is None or expires_at < self._soonest):
            self._soonest = expires_at
        return Verdict(True, self.limit, left - worst_micro_usd, 0.0)

    def settle(self, request_id: str, cost_micro_usd: int) -> None:
        """The request cost `cost_micro_usd` (never more than it reserved: the reservation
        was its worst case); the rest of the reservation is freed."""
        found = self._reserved.pop(request_id, None)
        if found is None:
            return
        reserved = found[0]
        self._held -= reserved
        self.spent += min(max(cost_micro_usd, 0), reserved)

    def holds(self, request_id: str) -> bool:
        return request_id in self._reserved

    def renew(self, request_id: str, expires_at: float) -> bool:
        """Push a reservation's expiry out; False if it is not held (settled or expired)."""
        found = self._reserved.get(request_id)
        if found is None:
            return False
        self._reserved[request_id] = (found[0], expires_at)
        return True

    def expire(self, now: float) -> None:
        """Reservations whose expiry has come count as spent at their worst case."""
        if self._soonest is None or now < self._soonest:
            return  # renewals only push expiries out, so nothing is due yet
        soonest: float | None = None
        for request_id, (amount, expires_at) in list(self._reserved.items()):
            if expires_at is None:
                continue
            if expires_at <= now:
                del self._reserved[request_id]
                self._held -= amount
                self.spent += amount
            elif soonest is None or expires_at < soonest:
                soonest = expires_at
        self._soonest = soonest

    def left(self) -> int:
        return self.limit - self.committed
