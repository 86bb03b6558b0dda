"""Settings every test process inherits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from fleetserve.testing.databases import PostgresUnavailable, postgres_database, postgres_required

# Gateways the tests start (in-process or as processes, which inherit this environment) stop
# without the load-balancer delay of a graceful shutdown (`shutdown_delay_s`, 2 s by
# default): no load balancer sends them anything. Tests of the delay set it themselves.
os.environ.setdefault("FLEETSERVE_SHUTDOWN_DELAY_S", "0")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test module, dropped after it: its
    postgresql+asyncpg:// URL (fleetserve.testing.databases). Without a server the module's
    tests that use it fail under CI=true (CI runs one) and are skipped elsewhere."""
    with ExitStack() as stack:
        try:
            database = stack.enter_context(postgres_database("fleetserve_test"))
        except PostgresUnavailable as exc:
            if postgres_required():
                pytest.fail(str(exc))
            pytest.skip(str(exc))
        yield database.url
