"""CSV files of a run, for spreadsheets and pandas.

- `report.csv`: one row per second of the run (the report's `series`), the fleet alongside;
- `requests.csv`: one row per request, with its derived latencies (only when the records
  are at hand: report.json does not keep them);
- `tenants.csv`: one row per tenant of a `bench --tenants` run (the report's `tenants`), its
  rejections in one column per reason.
Times are seconds from the run's start; an empty cell is an unknown value.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from fleetserve.bench.records import RequestRecord
from fleetserve.bench.report.model import BenchReport, SecondBucket, TenantSummary
from fleetserve.bench.samples import request_times

SERIES_FILENAME = "report.csv"
REQUESTS_FILENAME = "requests.csv"
TENANTS_FILENAME = "tenants.csv"

SERIES_COLUMNS: tuple[str, ...] = tuple(SecondBucket.model_fields)
REQUEST_COLUMNS: tuple[str, ...] = (
    "index",
    "intended_s",
    "sent_s",
    "lag_s",
    "first_token_s",
    "end_s",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "itl_max_s",
    "chunks",
    "prompt_tokens",
    "output_tokens",
    "tokens_from_usage",
    "stream",
    "ok",
    "status",
    "error_kind",
    "error",
    "replica",
    "group",
    "tenant",
    "error_code",
    "ratelimit_remaining_requests",
    "ratelimit_remaining_tokens",
)
# The reasons OpenAI's API (and a fleetserve gateway) refuses a request with; any other code
# a target sends goes to `rejected_other`.
REJECTION_REASONS = ("invalid_api_key", "model_not_allowed", "rate_limit_exceeded",
                     "insufficient_quota")  # fmt: skip
TENANT_COLUMNS: tuple[str, ...] = (
    *(name for name in TenantSummary.model_fields if name != "rejected_by_reason"),
    *(f"rejected_{reason}" for reason in REJECTION_REASONS),
    "rejected_other",
)

Cell = str | int | float | bool | None


def series_rows(report: BenchReport) -> list[dict[str, Cell]]:
    return [bucket.model_dump() for bucket in report.series]


def request_rows(records: Sequence[RequestRecord]) -> list[dict[str, Cell]]:
    rows: list[dict[str, Cell]] = []
    for r in records:
        times = request_times(r)
        rows.append(
            {
                "index": r.index,
                "intended_s": r.intended_s,
                "sent_s": r.sent_s,
                "lag_s": r.lag_s,
                "first_token_s": r.first_token_s,
                "end_s": r.end_s,
                "ttft_s": times.ttft_s,
                "tpot_s": times.tpot_s,
                "e2e_s": times.e2e_s,
                "itl_max_s": max(times.itl_s) if times.itl_s else None,
                "chunks": len(r.token_times_s),
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens,
                "tokens_from_usage": r.tokens_from_usage,
                "stream": r.stream,
                "ok": r.ok,
                "status": r.status,
                "error_kind": r.error_kind,
                "error": r.error,
                "replica": r.replica,
                "group": r.group,
                "tenant": r.tenant,
                "error_code": r.error_code,
                "ratelimit_remaining_requests": r.ratelimit_remaining_requests,
                "ratelimit_remaining_tokens": r.ratelimit_remaining_tokens,
            }
        )
    return rows


def tenant_rows(report: BenchReport) -> list[dict[str, Cell]]:
    rows: list[dict[str, Cell]] = []
    for tenant in report.tenants:
        row: dict[str, Cell] = tenant.model_dump(exclude={"rejected_by_reason"})
        reasons = tenant.rejected_by_reason
        for reason in REJECTION_REASONS:
            row[f"rejected_{reason}"] = reasons.get(reason, 0)
        row["rejected_other"] = sum(n for r, n in reasons.items() if r not in REJECTION_REASONS)
        rows.append(row)
    return rows


def _write(path: Path, columns: Sequence[str], rows: list[dict[str, Cell]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return path


def write_csv(
    report: BenchReport, out_dir: Path, records: Sequence[RequestRecord] | None = None
) -> list[Path]:
    """Write report.csv, requests.csv when `records` are given, and tenants.csv when the run
    had tenants; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_write(out_dir / SERIES_FILENAME, SERIES_COLUMNS, series_rows(report))]
    if records is not None:
        paths.append(_write(out_dir / REQUESTS_FILENAME, REQUEST_COLUMNS, request_rows(records)))
    if report.tenants:
        paths.append(_write(out_dir / TENANTS_FILENAME, TENANT_COLUMNS, tenant_rows(report)))
    return paths
