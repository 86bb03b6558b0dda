"""`bench --tenants`: the file model, what each tenant inherits, the runner driving tenants at
once, the per-tenant section and its renderers, and the client reading refusals."""

from __future__ import annotations

import asyncio
import csv
import math
import secrets
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from fleetserve.bench.client import BenchClient, ClientSettings
from fleetserve.bench.lengths import Fixed
from fleetserve.bench.records import RequestRecord
from fleetserve.bench.report.console import summary
from fleetserve.bench.report.csv_out import TENANTS_FILENAME, write_csv
from fleetserve.bench.report.html import render_html
from fleetserve.bench.report.json_out import load_report, write_json
from fleetserve.bench.report.model import BenchReport, RunConfig
from fleetserve.bench.runner import RunLimits, RunResult, Sender, TenantLoad, run_tenants
from fleetserve.bench.schedule import ClosedLoop
from fleetserve.bench.session import ClosedLoad, OpenLoad
from fleetserve.bench.stats import summarize
from fleetserve.bench.tenant_stats import TenantInfo, tenant_notes, tenant_section
from fleetserve.bench.tenants import (
    TenantDefaults,
    TenantPlan,
    parse_tenants,
    resolve_tenants,
)
from fleetserve.bench.workload import BuiltRequest, WorkloadSpec
from fleetserve.clock import RealClock
from fleetserve.errors import ConfigError
from fleetserve.testing.clock import FakeClock

SECRET = secrets.token_urlsafe(32)  # random: it cannot appear in any output by chance
KEY = f"fs-AbCd1234-{SECRET}"
SOURCE = "t.yaml"
MAX_STEPS = 100_000


def defaults(**changes: Any) -> TenantDefaults:
    base: dict[str, Any] = {
        "workload": WorkloadSpec(model="m", output_tokens=Fixed(32)),
        "duration_s": 10.0,
        "users": "4",
        "arrivals": "poisson",
        "seed": 7,
    }
    return TenantDefaults(**(base | changes))


def resolve(text: str, tmp_path: Path | None = None, **changes: Any) -> list[TenantPlan]:
    folder = tmp_path or Path(".")
    return resolve_tenants(
        parse_tenants(text, SOURCE), defaults(**changes), source=folder / SOURCE,
        environ={"TEAM_KEY": KEY, "PLAIN_KEY": "sk-plain-key"},
    )  # fmt: skip


# --- the file ------------------------------------------------------------------------------


def test_a_file_resolves_with_the_commands_flags_filling_in_the_rest() -> None:
    plans = resolve(f"""
tenants:
  - name: search
    key: {KEY}
    users: 20
    output_tokens: 64
  - name: batch
    key_env: PLAIN_KEY
    rate_rps: "ramp:from=1,to=5,over=10"
    arrivals: constant
    stream: false
    model: big
    temperature: 0.5
    max_requests: 9
  - name: quiet
""")
    search, batch, quiet = plans
    assert (search.key, search.key_prefix, search.key_source) == (KEY, "fs-AbCd1234", "key")
    assert isinstance(search.load, ClosedLoad)
    assert search.load.users.users == 20
    assert search.workload.output_tokens == Fixed(64)
    assert search.workload.model == "m"
    assert (batch.key, batch.key_prefix, batch.key_source) == (
        "sk-plain-key",
        None,
        "key_env PLAIN_KEY",
    )
    assert isinstance(batch.load, OpenLoad)
    assert batch.load.arrivals == "constant"
    assert "ramp:from=1,to=5,over=10" in batch.load.description
    assert (batch.workload.model, batch.workload.stream) == ("big", False)
    assert batch.workload.extra_body == {"temperature": 0.5}
    assert batch.workload.output_tokens == Fixed(32)  # the command's
    assert batch.max_requests == 9
    # quiet gives nothing: the command's closed loop of 4 users, no key, the command's bound.
    assert isinstance(quiet.load, ClosedLoad)
    assert quiet.load.users.users == 4
    assert (quiet.key, quiet.key_source, quiet.max_requests) == (None, "none", 100_000)
    assert [p.seed for p in plans] == [7, 8, 9]  # tenants do not send identical prompts


def test_concurrency_is_users_and_the_command_key_is_inherited() -> None:
    (plan,) = resolve("tenants: [{name: a, concurrency: 3, think_time_s: 0.5}]", api_key=KEY)
    assert isinstance(plan.load, ClosedLoad)
    assert plan.load.users == ClosedLoop(3, 0.5)
    assert (plan.key, plan.key_prefix, plan.key_source) == (KEY, "fs-AbCd1234", "--api-key")


def test_a_dataset_is_found_beside_the_file(tmp_path: Path) -> None:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello there"}\n')
    (plan,) = resolve("tenants: [{name: a, users: 1, dataset: prompts.jsonl}]", tmp_path)
    assert [row.prompt for row in plan.workload.dataset] == ["hello there"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param("tenants: [{name: a, users: 2, rate_rps: 3}]",
                     "tenants[0] (a): give one of rate_rps, users", id="two-loads"),
        pytest.param("tenants: [{name: a, users: 0}]", "tenants[0] (a).users:", id="no-users"),
        pytest.param("tenants: [{name: a, rate_rps: -1}]", "(a).rate_rps: rate_rps must be",
                     id="negative-rate"),
        pytest.param("tenants: [{name: a, rate_rps: 'ramp:from=1'}]", "(a).rate_rps: pattern",
                     id="bad-pattern"),
        pytest.param("tenants: [{name: a, users: true}]", "(a).users: input should be",
                     id="bool-users"),
        pytest.param("tenants: [{name: 'a b', users: 1}]", "tenants[0] (a b).name:",
                     id="bad-name"),
        pytest.param("tenants: [{name: a, users: 1}, {name: a, users: 1}]",
                     "tenants: tenant name 'a' is given twice", id="same-name"),
        pytest.param("tenants: [{name: a, users: 1, colour: red}]", "(a).colour: extra inputs",
                     id="unknown-field"),
        pytest.param("tenants: [{name: a, users: 1, key: k, key_env: K}]",
                     "give key or key_env, not both", id="two-keys"),
        pytest.param("tenants: [{name: a, users: 1, key_env: 'not a name'}]", "(a).key_env:",
                     id="bad-env-name"),
        pytest.param("tenants: [{name: a, users: 1, arrivals: poisson}]",
                     "arrivals applies to an open loop", id="arrivals-on-users"),
        pytest.param("tenants: [{name: a, rate_rps: 2, think_time_s: 1}]",
                     "think_time_s applies to a closed loop", id="think-on-rate"),
        pytest.param("tenants: [{name: a, users: 1, prompt_tokens: 'uniform:lo=5'}]",
                     "(a).prompt_tokens: length", id="bad-length"),
        pytest.param("tenants: [{name: a, users: 1, shared_prefix: '8'}]",
                     "(a).shared_prefix: shared prefix takes GROUPS:TOKENS", id="bad-prefix"),
        pytest.param("tenants: []", "tenants: list should have at least 1 item", id="empty"),
        pytest.param("- name: a", "expected a mapping with a 'tenants:' list", id="a-list"),
        pytest.param("tenants: [{name: a", "at line 1", id="bad-yaml"),
    ],
)  # fmt: skip
def test_a_bad_file_is_one_line_naming_the_file_and_field(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tenants(text, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"tenants file {SOURCE}: ")
    assert words in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "changes", "words"),
    [
        pytest.param("tenants: [{name: a}]", {"users": None},
                     "(a).rate_rps: no load: give rate_rps or users, or --rate or --users",
                     id="no-load-anywhere"),
        pytest.param("tenants: [{name: a, users: 1}]", {"workload": WorkloadSpec(model="")},
                     "(a).model: no model", id="no-model-anywhere"),
        pytest.param("tenants: [{name: a, users: 1, key_env: UNSET_KEY}]", {},
                     "(a).key_env: the environment variable UNSET_KEY is not set", id="unset-env"),
        pytest.param("tenants: [{name: a, arrivals: constant}]", {},
                     "(a).arrivals: applies to an open loop", id="arrivals-on-inherited-users"),
        pytest.param("tenants: [{name: a, users: 1, dataset: nowhere.jsonl}]", {},
                     "(a).dataset: cannot read dataset", id="missing-dataset"),
    ],
)  # fmt: skip
def test_what_cannot_be_resolved_names_the_tenant_and_field(
    text: str, changes: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(text, **changes)
    assert str(caught.value).startswith(f"tenants file {SOURCE}: tenants[0] (a)")
    assert words in str(caught.value)


def test_a_key_never_shows_in_reprs_or_errors() -> None:
    parsed = parse_tenants(f"tenants: [{{name: a, users: 1, key: {KEY}}}]", SOURCE)
    (plan,) = resolve_tenants(parsed, defaults(), source=Path(SOURCE))
    assert SECRET not in repr(parsed)
    assert SECRET not in repr(plan)
    assert SECRET not in repr(defaults(api_key=KEY))
    for bad in (f"'{KEY} x'", f"{KEY}: x", f'"{KEY}\\r\\nX-Evil: 1"', f"[{KEY}]"):
        with pytest.raises(ConfigError) as caught:
            parse_tenants(f"tenants: [{{name: a, users: 1, key: {bad}}}]", SOURCE)
        assert SECRET not in str(caught.value)


# --- the runner: tenants at once -----------------------------------------------------------


class FakeSender:
    """Answers after `service_s` of fake time; remembers what it sent."""

    def __init__(self, clock: FakeClock, t0: float, service_s: float) -> None:
        self.clock, self.t0, self.service_s = clock, t0, service_s
        self.sent: list[RequestRecord] = []
        self.closed = False

    async def send(self, request: BuiltRequest, record: RequestRecord) -> None:
        record.sent_s = self.clock.now() - self.t0
        self.sent.append(record)
        await self.clock.sleep(self.service_s)
        record.end_s = record.first_token_s = self.clock.now() - self.t0
        record.status, record.output_tokens = 200, request.output_tokens

    async def close(self) -> None:
        self.closed = True


async def drive(clock: FakeClock, run: Coroutine[Any, Any, RunResult]) -> RunResult:
    task = asyncio.ensure_future(run)
    for _ in range(MAX_STEPS):
        if task.done():
            return task.result()
        await clock.advance(0.05)
    task.cancel()
    raise AssertionError("the run did not finish")


def request(tokens: int) -> Callable[[int], BuiltRequest]:
    return lambda _k: BuiltRequest("/v1/chat/completions", b"{}", True, tokens)


async def test_tenants_run_at_once_on_one_timeline_each_with_its_own_sender() -> None:
    clock = FakeClock()
    senders: dict[str, FakeSender] = {}

    def connect(name: str, service_s: float) -> Callable[[float], Sender]:
        def make(t0: float) -> Sender:
            senders[name] = FakeSender(clock, t0, service_s)
            return senders[name]

        return make

    loads = [
        TenantLoad("open", connect("open", 0.5), request(4), intended_s=[0.0, 0.5, 1.0, 1.5]),
        TenantLoad("closed", connect("closed", 1.0), request(8), users=ClosedLoop(2)),
        TenantLoad("capped", connect("capped", 0.1), request(2), users=ClosedLoop(1),
                   max_requests=3),
    ]  # fmt: skip
    result = await drive(clock, run_tenants(loads, clock=clock, limits=RunLimits(duration_s=2.0)))
    assert result.mode == "mixed"
    assert [r.index for r in result.records] == list(range(len(result.records)))
    by_tenant = {name: [r for r in result.records if r.tenant == name] for name in senders}
    assert [r.sent_s for r in by_tenant["open"]] == [0.0, 0.5, 1.0, 1.5]
    assert sorted(r.sent_s for r in by_tenant["closed"]) == [0.0, 0.0, 1.0, 1.0]
    assert len(by_tenant["capped"]) == 3  # its own bound, not the run's
    for name, sender in senders.items():
        assert sender.sent == by_tenant[name]  # every request went by its tenant's sender
        assert sender.closed
    assert all(r.ok for r in result.records)
    assert result.scheduled == 4 + 4 + 3
    with pytest.raises(ConfigError):
        TenantLoad("both", connect("x", 1), request(1), intended_s=[0.0], users=ClosedLoop(1))


# --- the per-tenant section ----------------------------------------------------------------


def record(index: int, tenant: str, *, status: int = 200, code: str | None = None,
           sent_s: float = 0.0, output: int = 10, ttft_s: float | None = 0.1,
           remaining: tuple[int | None, int | None] = (None, None)) -> RequestRecord:  # fmt: skip
    r = RequestRecord(index, sent_s, sent_s, sent_s + 0.5, True, tenant=tenant)
    r.status = status
    r.ratelimit_remaining_requests, r.ratelimit_remaining_tokens = remaining
    if status != 200:
        r.error_kind, r.error, r.error_code = "http_4xx", f"HTTP {status}", code
        if status >= 500:
            r.error_kind = "http_5xx"
        return r
    r.prompt_tokens, r.output_tokens, r.tokens_from_usage = 20, output, True
    if ttft_s is not None:
        r.first_token_s = sent_s + ttft_s
        r.token_times_s = [sent_s + ttft_s, sent_s + 0.5]
    return r


TENANTS = [
    TenantInfo("alpha", "closed loop, 2 users", "m", key_prefix="fs-AbCd1234", key_source="key"),
    TenantInfo("beta", "open loop, constant arrivals, steady 5 req/s", "m", stream=False,
               key_source="key_env BETA"),
    TenantInfo("idle", "closed loop, 1 users", "m"),
]  # fmt: skip


def tenant_records() -> list[RequestRecord]:
    return [
        record(0, "alpha", sent_s=0.0, output=30, remaining=(9, 900)),
        record(1, "alpha", sent_s=2.0, output=30, ttft_s=0.3, remaining=(7, 700)),
        record(2, "alpha", status=429, code="rate_limit_exceeded", sent_s=1.0, remaining=(8, 800)),
        record(3, "beta", output=40, ttft_s=None),
        record(4, "beta", status=401, code="invalid_api_key", sent_s=0.5),
        record(5, "beta", status=429, code="insufficient_quota", sent_s=0.6),
        record(6, "beta", status=403, code=None, sent_s=0.7),
        record(7, "beta", status=503, code="no_replica_available", sent_s=0.8),
        record(8, "stranger", output=1000),  # not a tenant of the run: left out
    ]


def test_the_section_counts_each_tenant_by_outcome_and_reason() -> None:
    alpha, beta, idle = tenant_section(tenant_records(), TENANTS, window_s=4.0)
    assert (alpha.requests, alpha.ok, alpha.rejected, alpha.errors) == (3, 2, 1, 0)
    assert alpha.rejected_by_reason == {"rate_limit_exceeded": 1}
    assert (alpha.prompt_tokens, alpha.output_tokens) == (40, 60)
    assert alpha.ttft_p50_s == pytest.approx(0.2)
    assert alpha.ttft_p95_s == pytest.approx(0.29)
    assert alpha.e2e_p95_s == pytest.approx(0.5)
    assert (alpha.request_rate_rps, alpha.output_token_rate_tps) == (0.5, 15.0)
    assert alpha.output_share_frac == pytest.approx(0.6)
    # The latest-sent request that carried the headers (index 1, sent at 2.0), not the last.
    assert (alpha.ratelimit_remaining_requests, alpha.ratelimit_remaining_tokens) == (7, 700)
    assert (alpha.key_prefix, alpha.key_source) == ("fs-AbCd1234", "key")
    assert (beta.requests, beta.ok, beta.rejected, beta.errors) == (5, 1, 3, 1)
    assert beta.rejected_by_reason == {
        "invalid_api_key": 1, "insufficient_quota": 1, "http_403": 1
    }  # fmt: skip
    assert (beta.ttft_p50_s, beta.ttft_p95_s) == (None, None)  # not streamed
    assert beta.output_share_frac == pytest.approx(0.4)
    assert (beta.ratelimit_remaining_requests, beta.ratelimit_remaining_tokens) == (None, None)
    assert (idle.requests, idle.output_share_frac, idle.e2e_p95_s) == (0, 0.0, None)
    notes = tenant_notes([alpha, beta, idle])
    assert any("4 requests were refused" in n and "rate_limit_exceeded 1" in n for n in notes)
    with pytest.raises(ValueError, match="window_s"):
        tenant_section([], TENANTS, window_s=0.0)


def tenants_report() -> BenchReport:
    records = tenant_records()[:-1]
    config = RunConfig(url="http://127.0.0.1:9", model="m", load="2 tenants", duration_s=4.0)
    report = summarize(records, duration_s=4.0, config=config)
    section = tenant_section(records, TENANTS, report.totals.window_s)
    return report.model_copy(update={"tenants": section})


def test_every_renderer_shows_the_section(tmp_path: Path) -> None:
    report = tenants_report()
    loaded = load_report(write_json(report, tmp_path))
    assert loaded.tenants == report.tenants
    console = Console(width=160, record=True)
    console.print(summary(report))
    text = console.export_text()
    for words in ("Tenants", "alpha", "fs-AbCd1234 (file)", "key_env BETA", "rate_limit_exceeded 1",
                  "7 / 700", "60.00%"):  # fmt: skip
        assert words in text, words
    paths = write_csv(report, tmp_path)
    assert tmp_path / TENANTS_FILENAME in paths
    with (tmp_path / TENANTS_FILENAME).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == ["alpha", "beta", "idle"]
    assert rows[1]["rejected_invalid_api_key"] == "1"
    assert rows[1]["rejected_insufficient_quota"] == "1"
    assert rows[1]["rejected_other"] == "1"  # the 403 without a code
    assert rows[0]["ratelimit_remaining_tokens"] == "700"
    page = render_html(report)
    assert "<h2>Tenants</h2>" in page
    assert "invalid_api_key 1" in page


def test_a_run_without_tenants_has_no_section(tmp_path: Path) -> None:
    config = RunConfig(url="http://127.0.0.1:9", model="m", load="x", duration_s=1.0)
    report = summarize([record(0, "alpha")], duration_s=1.0, config=config)
    assert report.tenants == []
    assert TENANTS_FILENAME not in [p.name for p in write_csv(report, tmp_path)]
    assert "<h2>Tenants</h2>" not in render_html(report)


# --- the client reads refusals -------------------------------------------------------------


async def answer_once(head: bytes, body: bytes) -> tuple[asyncio.Server, str, list[bytes]]:
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        pytest.param("429 Too Many Requests", {"type": "rate_limit_error",
                     "code": "rate_limit_exceeded", "message": "slow down"},
                     "rate_limit_exceeded", id="429-code"),
        pytest.param("429 Too Many Requests", {"type": "insufficient_quota", "code": None,
                     "message": "budget"}, "insufficient_quota", id="429-type-only"),
        pytest.param("401 Unauthorized", {"message": "no"}, None, id="401-no-code"),
    ],
)  # fmt: skip
async def test_the_client_keeps_the_error_code_and_the_remaining_headers(
    status: str, error: dict[str, object], code: str | None
) -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        "x-ratelimit-remaining-requests: 0\r\nx-ratelimit-remaining-tokens: 1234\r\n"
    ).encode()
    server, url, heads = await answer_once(head, orjson.dumps({"error": error}))
    clock = RealClock()
    client = BenchClient(ClientSettings(url, api_key=KEY), clock, t0=clock.now())
    rec = RequestRecord(0, 0.0, math.nan, math.nan, False, tenant="alpha")
    try:
        await client.send(BuiltRequest("/v1/completions", b"{}", False, 4), rec)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    assert (rec.error_kind, rec.error_code, rec.rejected) == ("http_4xx", code, True)
    assert (rec.ratelimit_remaining_requests, rec.ratelimit_remaining_tokens) == (0, 1234)
    assert f"Authorization: Bearer {KEY}\r\n".encode() in heads[0]
    assert SECRET not in repr(ClientSettings(url, api_key=KEY))
