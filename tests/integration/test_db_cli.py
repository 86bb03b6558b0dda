"""`fleetserve db upgrade` run as a process: on SQLite in the state directory, on the real
PostgreSQL (by flag and by environment, several at once), and bad URLs as one line."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleetserve.tenancy.database import head_revision
from fleetserve.testing.databases import TemporaryDatabase, temporary_postgres_database
from fleetserve.testing.stack import env_without_settings, fleetserve_argv

pytestmark = pytest.mark.integration

TIMEOUT_S = 60


def db_upgrade(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleetserve_argv("db", "upgrade", *args), capture_output=True, text=True,
        timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, env=env_without_settings(**env),
        check=False,
    )  # fmt: skip


def test_sqlite_in_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = db_upgrade(FLEETSERVE_STATE_DIR=str(state))
    assert first.returncode == 0, first.stderr
    assert f"upgraded the database sqlite+aiosqlite:///{state}/fleetserve.db" in first.stdout
    assert f"from revision (empty) to {head_revision()}" in first.stdout
    assert (state / "fleetserve.db").is_file()
    second = db_upgrade(FLEETSERVE_STATE_DIR=str(state))
    assert second.returncode == 0, second.stderr
    assert f"is up to date (revision {head_revision()})" in second.stdout
    assert first.stderr == second.stderr == ""


def test_the_flag_outranks_the_environment(tmp_path: Path) -> None:
    flagged, env = tmp_path / "flag.db", tmp_path / "env.db"
    result = db_upgrade(
        "--database-url", f"sqlite:///{flagged}", FLEETSERVE_DATABASE_URL=f"sqlite:///{env}"
    )
    assert result.returncode == 0, result.stderr
    assert flagged.is_file()
    assert not env.exists()


@pytest.fixture
async def database(postgres_url: str) -> AsyncIterator[TemporaryDatabase]:
    del postgres_url  # the server is up (else this skips, or fails in CI)
    async with temporary_postgres_database("fleetserve_test_cli") as made:
        yield made


def test_postgres_by_flag_then_by_environment(database: TemporaryDatabase) -> None:
    first = db_upgrade("--database-url", database.plain_url)
    assert first.returncode == 0, first.stderr
    assert f"upgraded the database {database.url} " in first.stdout
    assert "from revision (empty)" in first.stdout
    second = db_upgrade(FLEETSERVE_DATABASE_URL=database.plain_url)
    assert second.returncode == 0, second.stderr
    assert "is up to date" in second.stdout


def test_several_processes_at_once(database: TemporaryDatabase) -> None:
    argv = fleetserve_argv("db", "upgrade", "--database-url", database.plain_url)
    env = env_without_settings()
    processes = [
        subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    said = sorted("upgraded" if "upgraded" in out else "up to date" for out, _ in outputs)
    assert said == ["up to date", "up to date", "upgraded"]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        pytest.param("postgresql://fs:s3cret@127.0.0.1:9/fleet", "cannot open the database "
                     "postgresql+asyncpg://fs:***@127.0.0.1:9/fleet", id="refused"),
        pytest.param("mysql://fs:s3cret@127.0.0.1/fleet", "unsupported database URL "
                     "'mysql://fs:***@127.0.0.1/fleet'", id="mysql"),
        pytest.param("postgresql://fs:s3cret@127.0.0.1:port/fleet", "invalid database URL",
                     id="bad-port"),
        pytest.param("s3cret", "invalid database URL", id="not-a-url"),
    ],
)  # fmt: skip
def test_a_bad_url_is_one_line_without_the_password(tmp_path: Path, url: str, words: str) -> None:
    for result in (
        db_upgrade("--database-url", url, FLEETSERVE_STATE_DIR=str(tmp_path)),
        db_upgrade(FLEETSERVE_DATABASE_URL=url, FLEETSERVE_STATE_DIR=str(tmp_path)),
    ):
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "Traceback" not in output
        assert "s3cret" not in output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ")
        assert words in lines[0]


def test_a_missing_database_is_named(postgres_url: str, tmp_path: Path) -> None:
    del postgres_url  # the server is up (else this skips, or fails in CI)
    url = "postgresql://postgres:s3cret@127.0.0.1:5432/no_such_db_here"  # trust auth
    result = db_upgrade("--database-url", url, FLEETSERVE_STATE_DIR=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: cannot open the database postgresql+asyncpg://postgres:***@127.0.0.1:5432/"
        'no_such_db_here: database "no_such_db_here" does not exist'
    )


def test_help_has_an_example() -> None:
    result = subprocess.run(
        fleetserve_argv("db", "upgrade", "--help"), capture_output=True, text=True,
        timeout=TIMEOUT_S, env=env_without_settings(COLUMNS="200"), check=False,
    )  # fmt: skip
    assert result.returncode == 0
    assert "Example: fleetserve db upgrade --database-url postgresql://" in result.stdout
    assert "--database-url" in result.stdout
