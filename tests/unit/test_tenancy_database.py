"""Database URLs: which ones the store takes, how it normalises them, and how it shows them
(never with the password)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fleetserve.errors import ConfigError
from fleetserve.tenancy.changes import UNSET, TenantChanges
from fleetserve.tenancy.database import database_url, mask_url
from fleetserve.tenancy.model import BudgetSpec, Limits, Priority, Tenant


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("postgresql://u:pw@h/db", "postgresql://u:***@h/db", id="plain"),
        pytest.param("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db", id="at-in-password"),
        pytest.param("postgresql://u:p/s:s@h:5/db", "postgresql://u:***@h:5/db", id="slash-colon"),
        pytest.param("postgresql://u@h/db?password=pw&ssl=require",
                     "postgresql://u@h/db?password=***&ssl=require", id="query-password"),
        pytest.param("postgresql://u@h/db?x=a@b", "postgresql://u@h/db?x=a@b", id="at-in-query"),
        pytest.param("postgresql://h/db", "postgresql://h/db", id="no-user"),
        pytest.param("sqlite:////var/x.db", "sqlite:////var/x.db", id="sqlite"),
    ],
)  # fmt: skip
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        pytest.param("postgresql://u@h/db", "postgresql+asyncpg://u@h/db", id="postgresql"),
        pytest.param("postgres://u@h:6543/db", "postgresql+asyncpg://u@h:6543/db", id="postgres"),
        pytest.param("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db", id="asyncpg"),
        pytest.param("postgresql://u@h/db?sslmode=require",
                     "postgresql+asyncpg://u@h/db?ssl=require", id="sslmode"),
    ],
)  # fmt: skip
def test_postgres_urls_go_through_asyncpg(tmp_path: Path, url: str, normalised: str) -> None:
    assert database_url(url, tmp_path).render_as_string(hide_password=False) == normalised
    assert list(tmp_path.iterdir()) == []  # the state directory is for SQLite only


def test_the_default_is_sqlite_in_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    url = database_url(None, state)
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str(state / "fleetserve.db")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "fleetserve.db").stat().st_mode) == 0o600


def test_an_unwritable_state_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot create the database"):
        database_url(None, blocker / "state")


def test_tenant_changes_leave_set_and_clear() -> None:
    tenant = Tenant(
        "t", weight=2, limits=Limits(rpm=1, tpm=2, max_concurrent=3), budget=BudgetSpec(5)
    )
    assert TenantChanges().apply(tenant) == tenant
    changed = TenantChanges(tpm=None, priority=Priority.BATCH, models=frozenset({"m"})).apply(
        tenant
    )
    assert changed.limits == Limits(rpm=1, tpm=None, max_concurrent=3)
    assert changed.priority == Priority.BATCH
    assert changed.models == frozenset({"m"})
    assert changed.budget == BudgetSpec(5)
    assert changed.weight == 2
    assert TenantChanges(budget=None).apply(tenant).budget is None
    assert repr(UNSET) == "UNSET"
