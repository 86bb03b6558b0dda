"""The tenant store against both databases it supports: SQLite in a temporary state directory
and the real PostgreSQL at 127.0.0.1:5432 (a database of this module's own, emptied between
tests and dropped after)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import delete, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from fleetserve.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from fleetserve.telemetry.quantiles import percentile_of
from fleetserve.tenancy import keys
from fleetserve.tenancy.model import (
    BudgetPeriod,
    BudgetSpec,
    FinishReason,
    Limits,
    Priority,
    Tenant,
    UsageRow,
)
from fleetserve.tenancy.schema import api_keys, tenants, usage
from fleetserve.tenancy.store import TenancyStore, TenantChanges
from fleetserve.testing.databases import drop_database, temporary_postgres_database

pytestmark = pytest.mark.integration

PEPPER = b"p" * 32
NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z
DAY = 86_400.0
FULL = Tenant(
    name="team-a",
    weight=2.5,
    priority=Priority.INTERACTIVE,
    models=frozenset({"llama-3.1-8b", "qwen2.5-7b"}),
    limits=Limits(rpm=60, tpm=100_000, max_concurrent=8),
    budget=BudgetSpec(limit_micro_usd=5_000_000, period=BudgetPeriod.WEEK, soft_alert_frac=0.9),
    created_at=NOW,
)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TenancyStore]:
    url: str | None = None
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    opened = await TenancyStore.open(url, tmp_path / "state")
    try:
        yield opened
    finally:
        await opened.close()
        if url is not None:  # the module shares one database: leave it empty
            engine = create_async_engine(url)
            async with engine.begin() as connection:
                for table in (usage, api_keys, tenants):
                    await connection.execute(delete(table))
            await engine.dispose()


def row(
    request_id: str,
    *,
    tenant: str = "team-a",
    key: str | None = "AAAAAAAA",
    model: str = "m1",
    status: int = 200,
    prompt: int = 10,
    completion: int = 20,
    cost: int = 30,
    ttft_s: float | None = 0.1,
    started_at: float = NOW,
    finish: FinishReason = FinishReason.STOP,
) -> UsageRow:
    return UsageRow(
        request_id=request_id,
        tenant=tenant,
        key_prefix=key,
        model=model,
        replica="http://127.0.0.1:8001",
        status=status,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_micro_usd=cost,
        queue_s=0.01,
        ttft_s=ttft_s,
        e2e_s=1.5,
        started_at=started_at,
        ended_at=started_at + 1.5,
        finish_reason=finish,
    )


# -- tenants ------------------------------------------------------------------------------


async def test_a_tenant_round_trips_with_every_field(store: TenancyStore) -> None:
    assert await store.create_tenant(FULL) == FULL
    assert await store.get_tenant("team-a") == FULL
    plain = await store.create_tenant(Tenant(name="b"))
    assert plain.created_at > 0  # stamped when not given
    assert plain.models is None
    assert plain.budget is None
    assert not plain.limits.any
    assert await store.list_tenants() == [plain, FULL]  # by name
    assert await store.get_tenant("nobody") is None


async def test_an_empty_model_list_is_kept_apart_from_every_model(store: TenancyStore) -> None:
    await store.create_tenant(Tenant(name="none-allowed", models=frozenset()))
    got = await store.get_tenant("none-allowed")
    assert got is not None
    assert got.models == frozenset()
    assert not got.may_use("m1")


async def test_a_taken_name_is_a_conflict(store: TenancyStore) -> None:
    await store.create_tenant(FULL)
    with pytest.raises(ConflictError, match="already exists") as caught:
        await store.create_tenant(Tenant(name="team-a", weight=9))
    assert caught.value.status == 409
    assert await store.get_tenant("team-a") == FULL


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("x'; DROP TABLE tenants; --", id="sql-quote"),
        pytest.param('x"; DELETE FROM api_keys; --', id="sql-double-quote"),
        pytest.param("a" * 64, id="64-chars"),
        pytest.param("a" * 100_000, id="100k-chars"),
        pytest.param("", id="empty"),
        pytest.param("-lead", id="leading-dash"),
        pytest.param("a b", id="space"),
        pytest.param("tëam", id="non-ascii"),
        pytest.param("a\x00b", id="nul"),
    ],
)
async def test_bad_names_are_400_and_harmless(store: TenancyStore, name: str) -> None:
    await store.create_tenant(FULL)
    with pytest.raises(InvalidRequestError, match="invalid tenant name") as caught:
        await store.create_tenant(Tenant(name=name))
    assert caught.value.status == 400
    assert len(caught.value.message) < 200
    assert await store.get_tenant(name) is None
    assert await store.list_tenants() == [FULL]  # the table is there, and untouched


@pytest.mark.parametrize(
    ("tenant", "param"),
    [
        pytest.param(Tenant("t", weight=0), "weight", id="weight-0"),
        pytest.param(Tenant("t", weight=float("nan")), "weight", id="weight-nan"),
        pytest.param(Tenant("t", weight=1e9), "weight", id="weight-huge"),
        pytest.param(Tenant("t", limits=Limits(rpm=0)), "rpm", id="rpm-0"),
        pytest.param(Tenant("t", limits=Limits(rpm=-5)), "rpm", id="rpm-negative"),
        pytest.param(Tenant("t", limits=Limits(rpm=True)), "rpm", id="rpm-bool"),
        pytest.param(Tenant("t", limits=Limits(tpm=10**13)), "tpm", id="tpm-huge"),
        pytest.param(Tenant("t", limits=Limits(max_concurrent=0)), "max_concurrent",
                     id="concurrent-0"),
        pytest.param(Tenant("t", budget=BudgetSpec(-1)), "budget", id="budget-negative"),
        pytest.param(Tenant("t", budget=BudgetSpec(10**19)), "budget", id="budget-overflow"),
        pytest.param(Tenant("t", budget=BudgetSpec(1, soft_alert_frac=1.5)),
                     "soft_alert_frac", id="soft-alert-1.5"),
        pytest.param(Tenant("t", models=frozenset({""})), "models", id="model-empty"),
        pytest.param(Tenant("t", models=frozenset({"m" * 300})), "models", id="model-long"),
    ],
)  # fmt: skip
async def test_out_of_range_fields_are_400(store: TenancyStore, tenant: Tenant, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await store.create_tenant(tenant)
    assert caught.value.param == param
    assert await store.list_tenants() == []


async def test_update_sets_clears_and_leaves_fields(store: TenancyStore) -> None:
    await store.create_tenant(FULL)
    changed = await store.update_tenant(
        "team-a", TenantChanges(weight=4.0, rpm=None, models=None, budget=None)
    )
    assert changed.weight == 4.0
    assert changed.limits == Limits(rpm=None, tpm=100_000, max_concurrent=8)
    assert changed.models is None
    assert changed.budget is None
    assert changed.priority == Priority.INTERACTIVE
    assert changed.created_at == NOW
    assert await store.get_tenant("team-a") == changed
    assert await store.update_tenant("team-a", TenantChanges()) == changed
    assert TenantChanges().empty
    assert not TenantChanges(rpm=None).empty


async def test_a_bad_update_changes_nothing(store: TenancyStore) -> None:
    await store.create_tenant(FULL)
    with pytest.raises(InvalidRequestError):
        await store.update_tenant("team-a", TenantChanges(weight=2.0, tpm=0))
    assert await store.get_tenant("team-a") == FULL
    with pytest.raises(NotFoundError):
        await store.update_tenant("nobody", TenantChanges(weight=2.0))


async def test_concurrent_updates_of_one_tenant_all_land(
    store: TenancyStore, tmp_path: Path
) -> None:
    """21 updates at once, three to each field, through two stores (as two gateway processes
    would: separate engines and pools): a lost update would put a field back to its starting
    value (a read-modify-write that read before another's write)."""
    await store.create_tenant(Tenant(name="busy"))
    other = await TenancyStore.open(store.url_display, tmp_path / "other")  # no password
    written: dict[str, list[object]] = {
        "weight": [2.0, 3.0, 4.0],
        "priority": [Priority.BATCH, Priority.INTERACTIVE, Priority.BATCH],
        "models": [frozenset({"a"}), frozenset({"b"}), frozenset({"c"})],
        "rpm": [10, 20, 30],
        "tpm": [1000, 2000, 3000],
        "max_concurrent": [1, 2, 3],
        "budget": [BudgetSpec(1), BudgetSpec(2), BudgetSpec(3)],
    }
    changes = [
        TenantChanges(**{field: value})  # type: ignore[arg-type]
        for i in range(3)
        for field, values in written.items()
        for value in [values[i]]
    ]
    try:
        results = await asyncio.gather(
            *((store, other)[i % 2].update_tenant("busy", c) for i, c in enumerate(changes))
        )
    finally:
        await other.close()
    assert len(results) == 21
    final = await store.get_tenant("busy")
    assert final is not None
    assert final.weight in written["weight"]
    assert final.priority in written["priority"]
    assert final.models in written["models"]
    assert final.limits.rpm in written["rpm"]
    assert final.limits.tpm in written["tpm"]
    assert final.limits.max_concurrent in written["max_concurrent"]
    assert final.budget in written["budget"]


async def test_delete_takes_the_keys_and_leaves_the_usage(store: TenancyStore) -> None:
    await store.create_tenant(FULL)
    key, _ = await store.create_key("team-a", PEPPER, now=NOW)
    assert await store.insert_usage([row("r1", key=key.prefix)]) == 1
    assert await store.delete_tenant("team-a") is True
    assert await store.get_tenant("team-a") is None
    assert await store.find_key(key.prefix) is None
    assert await store.list_keys() == []
    assert [r.request_id for r in await store.usage_rows()] == ["r1"]
    assert await store.delete_tenant("team-a") is False
    await store.create_tenant(Tenant(name="team-a"))  # the name is free again


# -- keys ---------------------------------------------------------------------------------


async def test_a_key_is_shown_once_and_stored_as_its_digest(store: TenancyStore) -> None:
    await store.create_tenant(FULL)
    limits = Limits(rpm=5)
    key, token = await store.create_key(
        "team-a", PEPPER, label="ci", expires_at=NOW + DAY, limits=limits, now=NOW
    )
    parsed = keys.parse_key(token)
    assert parsed is not None
    assert parsed.prefix == key.prefix
    assert keys.matches(PEPPER, parsed, key.digest)
    assert (key.tenant, key.label, key.limits, key.created_at) == ("team-a", "ci", limits, NOW)
    assert key.expires_at == NOW + DAY
    assert key.revoked_at is None
    assert await store.find_key(key.prefix) == (key, FULL)
    secret = token.rsplit("-", 1)[1]
    engine = create_async_engine(store.url_display)  # no password in the tests' URLs
    async with engine.connect() as connection:
        stored = (await connection.execute(text("SELECT * FROM api_keys"))).all()
    await engine.dispose()
    assert len(stored) == 1
    assert all(secret not in str(value) for value in stored[0])  # never the key itself


async def test_key_lookups(store: TenancyStore) -> None:
    await store.create_tenant(FULL)
    await store.create_tenant(Tenant(name="b"))
    a1, _ = await store.create_key("team-a", PEPPER, now=NOW)
    a2, _ = await store.create_key("team-a", PEPPER, now=NOW + 1)
    b1, _ = await store.create_key("b", PEPPER, now=NOW)
    assert a1.prefix != a2.prefix
    assert await store.list_keys("team-a") == [a1, a2]
    assert await store.list_keys() == [b1, a1, a2]  # by tenant, then age
    assert await store.list_keys("nobody") == []
    assert await store.get_key(b1.prefix) == b1
    for prefix in ("ZZZZZZZZ", "short", "x'; --;;", "A" * 9, "", "AAAA\x00AAA"):
        assert await store.find_key(prefix) is None
        assert await store.get_key(prefix) is None


async def test_keys_created_while_their_tenant_is_deleted(store: TenancyStore) -> None:
    """Each create either lands before the delete (and goes with it) or finds no tenant."""
    await store.create_tenant(FULL)
    creates = [store.create_key("team-a", PEPPER, now=NOW) for _ in range(6)]
    results = await asyncio.gather(
        *creates[:3], store.delete_tenant("team-a"), *creates[3:], return_exceptions=True
    )
    assert results[3] is True
    for result in results[:3] + results[4:]:
        assert isinstance(result, tuple | NotFoundError), repr(result)
    assert await store.list_keys() == []


async def test_bad_key_requests(store: TenancyStore) -> None:
    with pytest.raises(NotFoundError):
        await store.create_key("nobody", PEPPER, now=NOW)
    await store.create_tenant(FULL)
    with pytest.raises(InvalidRequestError, match="expiry"):
        await store.create_key("team-a", PEPPER, expires_at=NOW - 1, now=NOW)
    with pytest.raises(InvalidRequestError, match="label"):
        await store.create_key("team-a", PEPPER, label="x" * 201, now=NOW)
    with pytest.raises(InvalidRequestError, match="rpm"):
        await store.create_key("team-a", PEPPER, limits=Limits(rpm=0), now=NOW)
    assert await store.list_keys() == []


async def test_rotation_keeps_the_old_key_until_the_grace_deadline(store: TenancyStore) -> None:
    await store.create_tenant(FULL)
    old, _ = await store.create_key("team-a", PEPPER, label="prod", limits=Limits(tpm=9), now=NOW)
    new, token = await store.rotate_key(old.prefix, PEPPER, grace_s=3600, now=NOW + 10)
    assert new.prefix != old.prefix
    assert keys.parse_key(token) is not None
    assert (new.tenant, new.label, new.limits) == ("team-a", "prod", Limits(tpm=9))
    assert new.expires_at is None
    assert new.created_at == NOW + 10
    aged = await store.get_key(old.prefix)
    assert aged is not None
    assert aged.expires_at == NOW + 10 + 3600
    assert aged.usable(NOW + 3600)
    assert not aged.usable(NOW + 3611)
    # Rotating the old key again cannot stretch its deadline.
    await store.rotate_key(old.prefix, PEPPER, grace_s=7200, now=NOW + 20)
    again = await store.get_key(old.prefix)
    assert again is not None
    assert again.expires_at == NOW + 10 + 3600
    assert len(await store.list_keys("team-a")) == 3


async def test_rotation_refusals(store: TenancyStore) -> None:
    await store.create_tenant(FULL)
    with pytest.raises(NotFoundError):
        await store.rotate_key("ZZZZZZZZ", PEPPER, grace_s=60, now=NOW)
    key, _ = await store.create_key("team-a", PEPPER, expires_at=NOW + 5, now=NOW)
    with pytest.raises(InvalidRequestError, match="expired"):
        await store.rotate_key(key.prefix, PEPPER, grace_s=60, now=NOW + 5)
    with pytest.raises(InvalidRequestError, match="grace"):
        await store.rotate_key(key.prefix, PEPPER, grace_s=-1, now=NOW)
    await store.revoke_key(key.prefix, now=NOW + 1)
    with pytest.raises(InvalidRequestError, match="revoked"):
        await store.rotate_key(key.prefix, PEPPER, grace_s=60, now=NOW + 2)


async def test_revocation(store: TenancyStore) -> None:
    await store.create_tenant(FULL)
    key, _ = await store.create_key("team-a", PEPPER, now=NOW)
    revoked = await store.revoke_key(key.prefix, now=NOW + 5)
    assert revoked.revoked_at == NOW + 5
    assert not revoked.usable(NOW + 5)
    assert revoked.usable(NOW + 4)
    assert (await store.revoke_key(key.prefix, now=NOW + 50)).revoked_at == NOW + 5
    found = await store.find_key(key.prefix)
    assert found is not None
    assert found[0] == revoked
    with pytest.raises(NotFoundError):
        await store.revoke_key("ZZZZZZZZ", now=NOW)


# -- usage --------------------------------------------------------------------------------


async def test_insert_usage_is_idempotent_on_request_id(store: TenancyStore) -> None:
    rows = [row("r1"), row("r2", ttft_s=None), row("r3", finish=FinishReason.CANCELLED)]
    assert await store.insert_usage(rows) == 3
    assert await store.insert_usage(rows) == 0
    assert await store.insert_usage([*rows, row("r4"), row("r4")]) == 1  # a batch's own too
    assert await store.insert_usage([]) == 0
    stored = await store.usage_rows()
    assert [r.request_id for r in stored] == ["r1", "r2", "r3", "r4"]
    assert stored[:3] == rows


async def test_text_no_database_takes_does_not_fail_a_batch(store: TenancyStore) -> None:
    odd = [row("n1", model="a\x00b"), row("n2", model="bad\udc80surrogate"), row("n3")]
    assert await store.insert_usage(odd) == 3
    models = [r.model for r in await store.usage_rows()]
    assert models == ["a\ufffdb", "bad?surrogate", "m1"]


async def test_five_thousand_rows_in_batches_of_500(store: TenancyStore) -> None:
    rows = [
        row(f"req-{i:05d}", tenant=f"t{i % 7}", started_at=NOW + i * 0.01, ttft_s=i / 1000)
        for i in range(5000)
    ]
    start = time.perf_counter()
    written = [await store.insert_usage(rows[i : i + 500]) for i in range(0, 5000, 500)]
    elapsed_s = time.perf_counter() - start
    assert written == [500] * 10
    assert elapsed_s < 30, f"5,000 rows took {elapsed_s:.1f} s"  # typically well under 1 s
    assert len(await store.usage_rows()) == 5000
    assert await store.insert_usage(rows[1000:1500]) == 0
    assert len(await store.usage_rows(limit=10)) == 10
    assert len(await store.usage_rows(tenant="t3")) == len(rows[3::7])


async def test_usage_totals_by_tenant_key_model_and_day(store: TenancyStore) -> None:
    rows = [
        row("a1", tenant="a", key="KEYAAAAA", model="m1", ttft_s=0.1, cost=100),
        row("a2", tenant="a", key="KEYAAAAA", model="m2", ttft_s=0.3, status=500,
            finish=FinishReason.ERROR, completion=0, cost=5),
        row("a3", tenant="a", key="KEYBBBBB", model="m1", ttft_s=0.2, status=200,
            finish=FinishReason.ERROR, started_at=NOW + DAY),
        row("a4", tenant="a", key=None, model="m1", ttft_s=None, status=429, started_at=NOW + DAY),
        row("b1", tenant="b", key="KEYCCCCC", model="m1", ttft_s=0.5, cost=7,
            started_at=NOW + 2 * DAY),
    ]  # fmt: skip
    await store.insert_usage(rows)
    by_tenant = {g.group: g for g in await store.usage(by="tenant")}
    a = by_tenant["a"]
    assert (a.requests, a.errors, a.prompt_tokens, a.completion_tokens) == (4, 3, 40, 60)
    assert a.cost_micro_usd == 100 + 5 + 30 + 30
    assert a.ttft_p95_s == pytest.approx(percentile_of([0.1, 0.3, 0.2], 95))
    assert by_tenant["b"].ttft_p95_s == pytest.approx(0.5)
    by_key = {g.group: g.requests for g in await store.usage(by="key", tenant="a")}
    assert by_key == {"KEYAAAAA": 2, "KEYBBBBB": 1, "-": 1}
    by_model = [(g.group, g.requests) for g in await store.usage(by="model")]
    assert by_model == [("m1", 4), ("m2", 1)]
    by_day = await store.usage(by="day")
    assert [(g.group, g.requests) for g in by_day] == [
        ("2025-06-15", 2), ("2025-06-16", 2), ("2025-06-17", 1)
    ]  # fmt: skip
    assert [g.ttft_p95_s for g in by_day] == pytest.approx(
        [percentile_of([0.1, 0.3], 95), 0.2, 0.5]
    )
    window = await store.usage(since=NOW + DAY, until=NOW + 2 * DAY, by="tenant")
    assert [(g.group, g.requests, g.errors) for g in window] == [("a", 2, 2)]
    no_ttft = await store.usage(since=NOW + DAY, until=NOW + 2 * DAY, by="key", tenant="a")
    assert [(g.group, g.ttft_p95_s) for g in no_ttft] == [("-", None), ("KEYBBBBB", 0.2)]
    assert await store.usage(tenant="nobody") == []
    with pytest.raises(InvalidRequestError):
        await store.usage(by="week")  # type: ignore[arg-type]


async def test_spend_since(store: TenancyStore) -> None:
    await store.insert_usage(
        [
            row("s1", cost=1_000_000, started_at=NOW - DAY),
            row("s2", cost=250_000, started_at=NOW),
            row("s3", cost=9, tenant="other", started_at=NOW),
        ]
    )
    assert await store.spend_micro_usd("team-a", None) == 1_250_000
    assert await store.spend_micro_usd("team-a", NOW) == 250_000
    assert await store.spend_micro_usd("team-a", NOW + 1) == 0
    assert await store.spend_micro_usd("nobody", None) == 0


# -- opening ------------------------------------------------------------------------------


async def test_sqlite_default_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with await TenancyStore.open(None, state) as store:
        assert store.dialect == "sqlite"
        assert store.url_display.endswith(f"{state}/fleetserve.db")
        await store.create_tenant(FULL)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "fleetserve.db").stat().st_mode) == 0o600
    engine = create_async_engine(f"sqlite+aiosqlite:///{state / 'fleetserve.db'}")
    async with engine.connect() as connection:
        mode = (await connection.execute(text("PRAGMA journal_mode"))).scalar_one()
    await engine.dispose()
    assert mode == "wal"


async def test_an_explicit_sqlite_url(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "tenants.db"
    async with await TenancyStore.open(f"sqlite:///{path}", tmp_path / "state") as store:
        await store.create_tenant(FULL)
    assert path.exists()
    assert not (tmp_path / "state").exists()
    async with await TenancyStore.open(f"sqlite+aiosqlite:///{path}", tmp_path) as store:
        assert await store.get_tenant("team-a") == FULL


@pytest.mark.parametrize(
    ("url", "words"),
    [
        pytest.param("postgresql://fs:s3cret@127.0.0.1:9/x", "cannot open the database",
                     id="refused"),
        pytest.param("mysql://fs:s3cret@127.0.0.1/x", "unsupported database URL", id="mysql"),
        pytest.param("postgresql://fs:s3cret@127.0.0.1:port/x", "invalid database URL",
                     id="bad-port"),
        pytest.param("postgresql://fs:s3cret@127.0.0.1:99999/x", "port 99999", id="port-range"),
        pytest.param("postgresql://fs:s3cret@127.0.0.1/x?bogus=1", "'bogus'", id="bad-parameter"),
        pytest.param("postgresql://fs:s3cret@/x", "names no host", id="no-host"),
        pytest.param("sqlite://", "in-memory", id="memory"),
        pytest.param("s3cret", "invalid database URL", id="not-a-url"),
    ],
)  # fmt: skip
async def test_a_bad_url_is_one_line_with_the_password_masked(
    tmp_path: Path, url: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await TenancyStore.open(url, tmp_path)
    message = str(caught.value)
    assert words in message
    assert "\n" not in message
    assert "s3cret" not in message


async def test_a_missing_postgres_database_names_it(postgres_url: str, tmp_path: Path) -> None:
    url = postgres_url.rsplit("/", 1)[0].replace("postgres@", "postgres:s3cret@")
    with pytest.raises(ConfigError, match="does not exist") as caught:
        await TenancyStore.open(f"{url}/no_such_db_{os.getpid()}", tmp_path)
    assert "s3cret" not in str(caught.value)
    assert "postgres:***@" in str(caught.value)


async def test_the_password_is_never_logged(
    postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # SQLAlchemy and Alembic log everything they would
    url = postgres_url.replace("postgres@", "postgres:s3cret@")  # trust auth: any password
    async with await TenancyStore.open(url, tmp_path) as store:
        assert store.url_display == postgres_url.replace("postgres@", "postgres:***@")
        await store.create_tenant(Tenant(name="logged"))
        await store.create_key("logged", PEPPER, now=NOW)
        assert await store.delete_tenant("logged")  # the module's database stays empty
    assert caplog.text  # something was logged
    assert "s3cret" not in caplog.text


async def test_a_store_not_migrated_asks_for_db_upgrade(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fleetserve db upgrade"):
        await TenancyStore.open(None, tmp_path, upgrade=False)
    async with await TenancyStore.open(None, tmp_path) as store:
        await store.create_tenant(FULL)
    async with await TenancyStore.open(None, tmp_path, upgrade=False) as store:
        assert await store.get_tenant("team-a") == FULL


class TcpRelay:
    """A TCP relay on 127.0.0.1 to the PostgreSQL server that the test can cut: it stops
    accepting and closes every relayed connection (as a server that went down)."""

    def __init__(self, port: int) -> None:
        self._target_port = port
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


async def test_a_server_that_goes_down_is_503(postgres_url: str, tmp_path: Path) -> None:
    server = make_url(postgres_url)
    relay = TcpRelay(server.port or 5432)
    port = await relay.start()
    relayed = server.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    store = await TenancyStore.open(relayed, tmp_path)
    try:
        assert await store.get_tenant("nobody") is None
        await relay.cut()
        with pytest.raises(ServiceUnavailableError, match="is unavailable") as caught:
            await store.get_tenant("nobody")
        assert f"127.0.0.1:{port}" in caught.value.message
        with pytest.raises(ServiceUnavailableError):
            await store.insert_usage([row("r1")])
    finally:
        await store.close()


async def test_a_database_that_goes_away_is_503(postgres_url: str, tmp_path: Path) -> None:
    del postgres_url  # the server is up (else this skips, or fails in CI)
    async with temporary_postgres_database("fleetserve_test_gone") as database:
        store = await TenancyStore.open(database.url, tmp_path)
        await store.create_tenant(FULL)
        await drop_database(database)  # with the store's connections still open
        try:
            with pytest.raises(ServiceUnavailableError, match="unavailable") as caught:
                await store.list_tenants()
            assert caught.value.status == 503
            with pytest.raises(ServiceUnavailableError):
                await store.insert_usage([row("r1")])
        finally:
            await store.close()
