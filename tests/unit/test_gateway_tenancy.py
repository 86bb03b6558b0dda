"""The gateway's tenancy steps that need no database: key lookup and its cache, OpenAI's
rate-limit headers, bounded tenant labels, and the hold queue's fair release order."""

from __future__ import annotations

import asyncio

import pytest

from fleetserve.config import HoldSettings
from fleetserve.errors import AuthenticationError, ServiceUnavailableError
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.hold import HoldQueue, Share
from fleetserve.gateway.tenancy import KeyCache, ratelimit_headers
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.tenant_metrics import OTHER, TenantLabels
from fleetserve.telemetry.window import LoadWindow
from fleetserve.tenancy.fairness import Priority
from fleetserve.tenancy.keys import new_key
from fleetserve.tenancy.limiter import Quota
from fleetserve.tenancy.model import ApiKey, Tenant
from fleetserve.testing.clock import FakeClock

PEPPER = b"p" * 32


class Keys:
    """A store's key lookup, counting its queries."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[ApiKey, Tenant]] = {}
        self.queries = 0
        self.gate: asyncio.Event | None = None

    def add(self, tenant: str = "team", **fields: float | None) -> str:
        issued = new_key(PEPPER)
        key = ApiKey(issued.prefix, tenant, issued.digest, **fields)  # type: ignore[arg-type]
        self.keys[issued.prefix] = (key, Tenant(tenant))
        return issued.token

    async def find(self, prefix: str) -> tuple[ApiKey, Tenant] | None:
        self.queries += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.keys.get(prefix)


def _bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=10.0)


async def test_a_good_key_gives_its_tenant_and_is_cached(clock: FakeClock) -> None:
    keys = Keys()
    token = keys.add("alpha")
    cache = KeyCache(keys.find, PEPPER, clock, ttl_s=0.5)
    for _ in range(5):
        principal = await cache.principal(_bearer(token))
        assert principal.tenant.name == "alpha"
    assert keys.queries == 1
    await clock.advance(0.6)  # past the TTL: a revocation would be seen now
    await cache.principal(_bearer(token))
    assert keys.queries == 2


@pytest.mark.parametrize(
    ("header", "says"),
    [
        pytest.param(None, "missing API key", id="missing"),
        pytest.param(b"Basic abc", "malformed", id="not-bearer"),
        pytest.param(b"Bearer sk-123", "malformed", id="foreign-key"),
        pytest.param(b"Bearer fs-short-x", "malformed", id="short"),
    ],
)
async def test_missing_and_malformed_keys_are_401(
    clock: FakeClock, header: bytes | None, says: str
) -> None:
    keys = Keys()
    cache = KeyCache(keys.find, PEPPER, clock, ttl_s=0.5)
    with pytest.raises(AuthenticationError, match=says):
        await cache.principal(header)
    assert keys.queries == 0  # nothing to look up


async def test_unknown_wrong_secret_expired_and_revoked_keys_are_401(clock: FakeClock) -> None:
    keys = Keys()
    cache = KeyCache(keys.find, PEPPER, clock, ttl_s=0.5)
    good = keys.add()
    unknown = new_key(PEPPER).token
    wrong = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    expired = keys.add(expires_at=clock.wall() - 1)
    revoked = keys.add(revoked_at=clock.wall() - 1)
    for token, says in [
        (unknown, "invalid API key"), (wrong, "invalid API key"),
        (expired, "has expired"), (revoked, "was revoked"),
    ]:  # fmt: skip
        with pytest.raises(AuthenticationError, match=says) as caught:
            await cache.principal(_bearer(token))
        secret = token[len("fs-") + 9 :]
        assert secret not in str(caught.value)  # the secret is never echoed


async def test_concurrent_misses_for_one_key_make_one_query(clock: FakeClock) -> None:
    keys = Keys()
    token = keys.add()
    keys.gate = asyncio.Event()
    cache = KeyCache(keys.find, PEPPER, clock, ttl_s=0.5)
    tasks = [asyncio.create_task(cache.principal(_bearer(token))) for _ in range(50)]
    await asyncio.sleep(0)
    keys.gate.set()
    results = await asyncio.gather(*tasks)
    assert {p.tenant.name for p in results} == {"team"}
    assert keys.queries == 1


async def test_forget_drops_a_revoked_key_at_once(clock: FakeClock) -> None:
    keys = Keys()
    token = keys.add()
    cache = KeyCache(keys.find, PEPPER, clock, ttl_s=60)
    await cache.principal(_bearer(token))
    prefix = token.split("-")[1]
    key, tenant = keys.keys[prefix]
    keys.keys[prefix] = (
        ApiKey(key.prefix, key.tenant, key.digest, revoked_at=clock.wall()),
        tenant,
    )
    await cache.principal(_bearer(token))  # still cached: the TTL is long here
    cache.forget(prefix)
    with pytest.raises(AuthenticationError, match="revoked"):
        await cache.principal(_bearer(token))


def test_ratelimit_headers_in_openai_format() -> None:
    headers = dict(ratelimit_headers(Quota(60, 59, 0.0), Quota(1000, 250, 75.2)))
    assert headers == {
        b"x-ratelimit-limit-requests": b"60",
        b"x-ratelimit-remaining-requests": b"59",
        b"x-ratelimit-reset-requests": b"0ms",
        b"x-ratelimit-limit-tokens": b"1000",
        b"x-ratelimit-remaining-tokens": b"250",
        b"x-ratelimit-reset-tokens": b"1m16s",
    }
    assert dict(ratelimit_headers(Quota(5, 0, 0.25), None)) == {
        b"x-ratelimit-limit-requests": b"5",
        b"x-ratelimit-remaining-requests": b"0",
        b"x-ratelimit-reset-requests": b"250ms",
    }


def test_tenant_labels_are_bounded() -> None:
    label = TenantLabels(top_n=3)
    assert [label(t) for t in ["a", "b", "a", "c", "d", "e", "b"]] == [
        "a", "b", "a", "c", OTHER, OTHER, "b",
    ]  # fmt: skip


async def test_the_hold_queue_releases_by_priority_then_fair_share() -> None:
    clock = FakeClock(start=5.0)
    fleet = Fleet()
    fleet.declare_model("m")
    replica = Replica(id="r", url="http://r", model="m", state=ReplicaState.READY,
                      max_concurrency=1)  # fmt: skip
    replica.in_flight = 1
    fleet.add(replica)
    holds = HoldQueue(fleet, HoldSettings(), clock, LoadWindow(), GatewayMetrics(),
                      retry_after_s=1)  # fmt: skip
    order: list[str] = []

    async def held(name: str, share: Share) -> None:
        await holds.hold("m", clock.now(), None, share)
        order.append(name)
        fleet.end("r")
        holds.freed("r", "m")

    heavy = Share("heavy", 1.0, Priority.STANDARD, 100)
    light = Share("light", 1.0, Priority.STANDARD, 100)
    urgent = Share("ui", 1.0, Priority.INTERACTIVE, 100)
    batch = Share("nightly", 1.0, Priority.BATCH, 100)
    tasks = [asyncio.create_task(held(f"batch{i}", batch)) for i in range(2)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(held(f"heavy{i}", heavy)) for i in range(4)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(held(f"light{i}", light)) for i in range(2)]
    tasks.append(asyncio.create_task(held("ui0", urgent)))
    await asyncio.sleep(0)
    assert holds.held("m") == 9
    fleet.end("r")
    holds.freed("r", "m")
    await asyncio.gather(*tasks)
    assert order[0] == "ui0"  # interactive first
    # standard: the two tenants alternate while both wait (equal weights and sizes)
    assert order[1:5] == ["heavy0", "light0", "heavy1", "light1"]
    assert order[5:7] == ["heavy2", "heavy3"]
    assert order[7:] == ["batch0", "batch1"]  # batch last


async def test_a_store_outage_serves_known_keys_and_refuses_unknown_ones_with_503(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys()
    known = keys.add("alpha")
    other = keys.add("beta")
    down = False

    async def find(prefix: str) -> tuple[ApiKey, Tenant] | None:
        if down:
            raise ServiceUnavailableError("the database postgresql://u@db:5432/x is unavailable")
        return await keys.find(prefix)

    cache = KeyCache(find, PEPPER, clock, ttl_s=0.5)
    await cache.principal(_bearer(known))
    down = True
    await clock.advance(1.0)  # past the TTL: the store is asked again, and fails
    for _ in range(3):
        assert (await cache.principal(_bearer(known))).tenant.name == "alpha"
    with pytest.raises(ServiceUnavailableError) as refused:
        await cache.principal(_bearer(other))
    assert "postgresql" not in str(refused.value)  # nothing of the database reaches clients
    outage_lines = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(outage_lines) == 1
    down = False
    await clock.advance(1.0)
    assert (await cache.principal(_bearer(other))).tenant.name == "beta"
