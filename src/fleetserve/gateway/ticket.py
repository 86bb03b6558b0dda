"""What tenancy knows about one admitted request, from admission to its ledger row."""

from __future__ import annotations

from dataclasses import dataclass

from fleetserve.protocol.sse import UsageTap
from fleetserve.tenancy.limiter import Admission
from fleetserve.tenancy.model import Price, Principal


@dataclass(slots=True, eq=False)
class Ticket:
    principal: Principal
    admission: Admission
    request_id: str  # the gateway's own id: unique, so the ledger's idempotent write keys on it
    body: bytes  # as sent upstream (with include_usage, or a budget's max_tokens cap)
    price: Price | None
    prompt_estimate: int  # tokens, for fair queueing before the engine tells (bytes / 4)
    started_at: float  # wall clock
    max_tokens: int | None = None  # as sent upstream (the client's, or a budget's cap)
    tap: UsageTap | None = None  # streams: reads the engine's usage, strips what we added
    usage: tuple[int, int] | None = None  # (prompt, completion) as the engine reported them
    output_events: int = 0  # stream events with generated output the client was sent

    @property
    def tenant(self) -> str:
        return self.principal.tenant.name
