"""The per-tenant section of a `bench --tenants` report: pure, from the run's records.

Per tenant: requests sent, ok, rejected by reason (OpenAI's error code of a 401, 403 or 429:
`invalid_api_key`, `model_not_allowed`, `rate_limit_exceeded`, `insufficient_quota`), other
errors, tokens in and out, TTFT p50/p95 and e2e p95 (ok requests, counted from the intended
send time as everywhere in bench), throughput over the run's measured window, its share of
every tenant's output tokens, and the last `x-ratelimit-remaining-*` the target sent it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from fleetserve.bench.records import RequestRecord
from fleetserve.bench.report.model import TenantSummary
from fleetserve.bench.samples import request_times
from fleetserve.telemetry.quantiles import percentile_of


@dataclass(frozen=True, slots=True)
class TenantInfo:
    """How the report names a tenant and its load; holds no secret."""

    name: str
    load: str
    model: str
    stream: bool = True
    key_prefix: str | None = None
    key_source: str = "none"


def rejection_reason(record: RequestRecord) -> str:
    """The error code of a refused request, or `http_<status>` when the body gave none."""
    return record.error_code or f"http_{record.status}"


def tenant_section(
    records: Sequence[RequestRecord], tenants: Sequence[TenantInfo], window_s: float
) -> list[TenantSummary]:
    """One summary per tenant, in the order given (the file's)."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s!r}")
    by_tenant: dict[str, list[RequestRecord]] = {t.name: [] for t in tenants}
    for record in records:
        if record.tenant in by_tenant:
            by_tenant[record.tenant].append(record)
    all_output = sum(r.output_tokens or 0 for rs in by_tenant.values() for r in rs if r.ok)
    return [_summary(t, by_tenant[t.name], window_s, all_output) for t in tenants]


def _summary(
    tenant: TenantInfo, records: list[RequestRecord], window_s: float, all_output: int
) -> TenantSummary:
    ok = [r for r in records if r.ok]
    rejected = [r for r in records if not r.ok and r.rejected]
    reasons = Counter(rejection_reason(r) for r in rejected)
    times = [request_times(r) for r in ok]
    ttft = [t.ttft_s for t in times if t.ttft_s is not None]
    e2e = [t.e2e_s for t in times]
    output = sum(r.output_tokens or 0 for r in ok)
    return TenantSummary(
        name=tenant.name,
        key_prefix=tenant.key_prefix,
        key_source=tenant.key_source,
        load=tenant.load,
        model=tenant.model,
        stream=tenant.stream,
        requests=len(records),
        ok=len(ok),
        rejected=len(rejected),
        rejected_by_reason=dict(reasons.most_common()),
        errors=len(records) - len(ok) - len(rejected),
        prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        output_tokens=output,
        ttft_p50_s=percentile_of(ttft, 50),
        ttft_p95_s=percentile_of(ttft, 95),
        e2e_p95_s=percentile_of(e2e, 95),
        request_rate_rps=len(ok) / window_s,
        output_token_rate_tps=output / window_s,
        output_share_frac=output / all_output if all_output else 0.0,
        ratelimit_remaining_requests=_last(records, "ratelimit_remaining_requests"),
        ratelimit_remaining_tokens=_last(records, "ratelimit_remaining_tokens"),
    )


def _last(records: Sequence[RequestRecord], name: str) -> int | None:
    """The value on the latest-sent request that carried it: the newest admission's view."""
    latest: tuple[float, int, int] | None = None
    for r in records:
        value = getattr(r, name)
        if value is not None and (latest is None or (r.sent_s, r.index) > latest[:2]):
            latest = (r.sent_s, r.index, value)
    return None if latest is None else latest[2]


def tenant_notes(section: Sequence[TenantSummary]) -> list[str]:
    """What a reader must see about the tenants: refusals, and tenants that got nothing."""
    notes: list[str] = []
    refused = sum(t.rejected for t in section)
    if refused:
        reasons: Counter[str] = Counter()
        for t in section:
            reasons.update(t.rejected_by_reason)
        listed = ", ".join(f"{code} {n:,}" for code, n in reasons.most_common())
        notes.append(
            f"{refused:,} requests were refused by the target's admission ({listed}); they "
            "count as errors in the totals, and per tenant as rejected, by reason."
        )
    starved = [t.name for t in section if t.requests and not t.ok]
    if starved:
        notes.append(f"No request of tenant(s) {', '.join(starved)} succeeded.")
    return notes
