"""What `fleetserve bench` records for each request: the one contract between the client that
measures and the stats and report that read it.

Every time is in seconds from the run's start (one monotonic clock for the whole run).
Latency is counted from `intended_s`, the schedule's send time, not from `sent_s`: when the
generator falls behind, its lag is latency the user would have seen (coordinated omission).
In a closed loop there is no schedule, so `intended_s == sent_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# HTTP statuses that mean "refused by admission" (OpenAI's 401, 403 and 429 errors).
REJECTION_STATUSES = frozenset((401, 403, 429))

# Why a request failed. None on a record means it succeeded.
ErrorKind = Literal[
    "connect",  # TCP connect refused or timed out
    "timeout",  # no response head, first token or next chunk within the client's timeout
    "http_4xx",  # the server answered 4xx (rate limited, bad request, unknown model ...)
    "http_5xx",  # the server answered 5xx (503 no replica, 502, 504 ...)
    "stream_error",  # the stream carried an error event or ended without [DONE]
    "disconnect",  # the connection closed mid-response
    "protocol",  # the response could not be parsed (not SSE, not JSON)
    "cancelled",  # still in flight when the run's duration ended
]


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it."""

    index: int  # position in the run's send order
    intended_s: float  # when the schedule meant to send it
    sent_s: float  # when it was actually written to the socket
    end_s: float  # last byte received, or the moment it failed
    stream: bool
    first_token_s: float | None = None  # first chunk carrying generated text (None: none came)
    # Arrival times of every chunk that carried generated text, first one included: ITL is
    # the gaps between them (vLLM's benchmark definition).
    token_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    # True when the token counts came from the server's `usage`; False when bench counted
    # content chunks itself (flagged in the report: one chunk may carry several tokens).
    tokens_from_usage: bool = False
    status: int | None = None  # HTTP status of the response head (None: no head came)
    error_kind: ErrorKind | None = None
    error: str | None = None  # a short human-readable message for the report
    replica: str | None = None  # x-fleetserve-replica header, when a fleetserve gateway serves
    group: str | None = None  # workload group, e.g. the shared-prefix group of its prompt
    tenant: str | None = None  # the tenant that sent it (`bench --tenants`), else None
    # The OpenAI error envelope's `code` of a non-2xx answer (`rate_limit_exceeded`,
    # `invalid_api_key`, ...), or its `type` when it has no code.
    error_code: str | None = None
    # OpenAI's x-ratelimit-remaining-requests / -tokens headers of the answer, when present.
    ratelimit_remaining_requests: int | None = None
    ratelimit_remaining_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def rejected(self) -> bool:
        """Refused by the target's tenancy (401 key, 403 model, 429 limit or budget), not
        failed: a measured outcome of the run, counted by `error_code`."""
        return self.status in REJECTION_STATUSES

    @property
    def lag_s(self) -> float:
        """How far the actual send trailed the schedule."""
        return self.sent_s - self.intended_s


@dataclass(slots=True, frozen=True)
class FleetSample:
    """The target fleet's state at one moment, sampled while bench runs.

    Read from a fleetserve gateway's admin endpoint or any Prometheus `/metrics`; a field the
    target does not expose is None (unknown), never 0.
    """

    t_s: float  # seconds from the run's start
    replicas_ready: int | None = None
    replicas_desired: int | None = None  # the autoscaler's target, when one runs
    replicas_starting: int | None = None
    replicas_draining: int | None = None
    in_flight: int | None = None  # requests in flight at the gateway (or engines' running)
    queue_depth: int | None = None  # engines' waiting requests plus requests held by the gateway
