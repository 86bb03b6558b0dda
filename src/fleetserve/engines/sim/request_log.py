"""The SIMULATED engine's own measurement of each request it served: a bounded ring buffer.

It exists so a load tester can be checked against the server it measures: `fleetserve bench`
against `fleetserve engine sim` must agree with what the server itself saw (issue 4's
accuracy check). The server records, per finished request, on its serving clock (monotonic
seconds, the same clock as the engine's step loop):

- `arrival_s`: the request reached the server: its HTTP parser began it (its first bytes were
  read off the socket) when the server stamps that (`fleetserve engine sim` does:
  `serve.stamping_protocol`), else, as `body_read_s`;
- `body_read_s`: the request body was fully read and the handler began (later than arrival by
  the time the request waited in the server's event loop behind other work);
- `first_write_s` / `last_write_s`: the first and the last response chunk were handed to the
  transport (for a stream the first carries the first token, the last the last token and
  `[DONE]`; for a buffered answer both are the one body write);
- `writes`: how many body writes the response took;
- `engine_first_token_s` / `engine_finished_s`: when the latency model produced the first and
  the last token (None if it never did), so the server's own delay is visible too.

A request's wait in the kernel's socket buffer before the server reads it is the one part of
its life no server-side stamp can see. `request_id` is the client's `X-Request-Id` header, if
it sent one (what lets a load tester match its records to these, one by one).

From them: TTFT = first_write - arrival (streams only), TPOT = (last_write - first_write) /
(output_tokens - 1), e2e = last_write - arrival. Recording costs one tuple append per request;
the handler keeps only the first and last write times, no per-token list.

Served at `GET /sim/requests` (`?since=ID` returns only later entries, `&limit=N` at most N of
them) and cleared with `DELETE /sim/requests`. Simulation only: a real vLLM has no such route.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

DEFAULT_CAPACITY = 100_000

# One finished request, as the hot path appends it (field order of `FIELDS`).
Entry = tuple[
    int,  # id: 1, 2, ... in finishing order, never reused (also across clear())
    float,  # arrival_s
    float | None,  # first_write_s (None: nothing was written)
    float | None,  # last_write_s
    int,  # writes
    float | None,  # engine_first_token_s
    float | None,  # engine_finished_s
    int,  # prompt_tokens
    int,  # output_tokens: text tokens written to the client
    str,  # finish_reason: stop, length, abort (engine shut down), disconnect (client left)
    bool,  # stream
    str | None,  # request_id: the X-Request-Id header
    float | None,  # body_read_s
]
FIELDS = (
    "id", "arrival_s", "first_write_s", "last_write_s", "writes", "engine_first_token_s",
    "engine_finished_s", "prompt_tokens", "output_tokens", "finish_reason", "stream",
    "request_id", "body_read_s",
)  # fmt: skip


class RequestLog:
    """The last `capacity` finished requests, oldest first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("the request log needs room for at least one request")
        self.capacity = capacity
        self._entries: deque[Entry] = deque(maxlen=capacity)
        self._ids = itertools.count(1)
        self._last_id = 0
        self._cleared_to = 0  # ids up to this one were cleared on purpose, not dropped

    def __len__(self) -> int:
        return len(self._entries)

    def record(
        self,
        arrival_s: float,
        first_write_s: float | None,
        last_write_s: float | None,
        writes: int,
        engine_first_token_s: float | None,
        engine_finished_s: float | None,
        prompt_tokens: int,
        output_tokens: int,
        finish_reason: str,
        stream: bool,
        request_id: str | None = None,
        body_read_s: float | None = None,
    ) -> None:
        self._last_id = entry_id = next(self._ids)
        self._entries.append((
            entry_id, arrival_s, first_write_s, last_write_s, writes,
            engine_first_token_s, engine_finished_s, prompt_tokens, output_tokens,
            finish_reason, stream, request_id, body_read_s,
        ))  # fmt: skip

    def clear(self) -> int:
        """Forget every entry (ids go on counting); returns how many there were."""
        n = len(self._entries)
        self._entries.clear()
        self._cleared_to = self._last_id
        return n

    def since(self, after_id: int, limit: int | None = None) -> list[Entry]:
        """Entries with an id above `after_id`, oldest first, at most `limit` of them."""
        entries = self._entries
        if not entries or entries[-1][0] <= after_id:
            return []
        # Ids are consecutive inside the deque (clear() empties it), so index arithmetic finds
        # the first entry wanted without a scan.
        start = max(0, after_id - entries[0][0] + 1)
        stop = len(entries) if limit is None else min(len(entries), start + max(0, limit))
        return list(itertools.islice(entries, start, stop))

    def page(self, after_id: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The JSON answer of `GET /sim/requests`."""
        entries = self.since(after_id, limit)
        oldest = self._entries[0][0] if self._entries else None
        # Entries after `after_id` that the ring dropped (not cleared) before they were read.
        missed = 0 if oldest is None else max(0, oldest - max(after_id, self._cleared_to) - 1)
        return {
            "simulated": True,
            "note": "fleetserve engine sim: the SIMULATED engine's own per-request timing "
            "(monotonic seconds on the server's clock). Not a vLLM API.",
            "capacity": self.capacity,
            "missed": missed,
            "next": entries[-1][0] if entries else after_id,
            "requests": [_as_dict(e) for e in entries],
        }


def _as_dict(entry: Entry) -> dict[str, Any]:
    row = dict(zip(FIELDS, entry, strict=True))
    arrival, first, last = entry[1], entry[2], entry[3]
    stream, output_tokens = entry[10], entry[8]
    row["ttft_s"] = first - arrival if stream and first is not None and output_tokens else None
    row["tpot_s"] = (
        (last - first) / (output_tokens - 1)
        if stream and first is not None and last is not None and output_tokens > 1
        else None
    )
    row["e2e_s"] = None if last is None else last - arrival
    return row
