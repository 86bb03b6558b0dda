"""Issue 11's cardinality must-show, against a real gateway process (auth = keys, SQLite in a
temporary state directory, one sim engine): 10,000 requests, each with a distinct junk model
name and a distinct junk key, add no more than 2 series to /metrics; junk model names with a
valid key add only `model="other"`; and tenants past `metrics_top_tenants` share `other`."""

from __future__ import annotations

import asyncio
import random
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx2 as httpx
import pytest

from fleetserve.fleet.processes import free_port
from fleetserve.testing.stack import FAST_HEALTH_ENV, Service, fleetserve_argv, services

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

MODEL = "sim-card"
JUNK = 10_000
CONCURRENCY = 32
TOP_TENANTS = 3
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) ")
ALPHABET = string.ascii_uppercase + string.digits


@dataclass
class Gateway:
    url: str
    service: Service

    def admin(self, method: str, path: str, body: object) -> dict[str, object]:
        answer = httpx.request(method, self.url + path, json=body, timeout=10)
        assert answer.status_code == 201, answer.text
        created: dict[str, object] = answer.json()
        return created


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    state = tmp_path_factory.mktemp("state")
    with services() as started:
        port = free_port()
        argv = fleetserve_argv("engine", "sim", "--port", str(port), "--model", MODEL,
                               "--profile", "instant", "--cold-start-s", "0")  # fmt: skip
        engine = started.start("engine", argv, port)
        engine.wait_ok("/health")
        fleet = Path(state) / "fleet.yaml"
        fleet.write_text(
            f"models:\n  - name: {MODEL}\n    engine: sim\n    replicas: [{engine.url}]\n"
        )
        port = free_port()
        argv = fleetserve_argv("gateway", "--port", str(port), "--fleet-file", str(fleet),
                               "--auth", "keys")  # fmt: skip
        env = {**FAST_HEALTH_ENV, "FLEETSERVE_STATE_DIR": str(state),
               "FLEETSERVE_TENANCY__METRICS_TOP_TENANTS": str(TOP_TENANTS)}  # fmt: skip
        service = started.start("gateway", argv, port, env)
        service.wait_ok("/ready")
        # The first scrape of the engine adds its figures: the baseline comes after it.
        service.process.wait_for(
            lambda: "fleetserve_replica_running{" in httpx.get(service.url + "/metrics").text,
            timeout_s=10, what="the engine's first metrics scrape",
        )  # fmt: skip
        yield Gateway(service.url, service)


def series(text: str) -> set[str]:
    """Every series a /metrics page shows (`_created` samples belong to their series)."""
    found = set()
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and "_created" not in match.group(1).split("{")[0]:
            found.add(match.group(1))
    return found


def _junk(n: int) -> str:
    return "".join(random.choices(ALPHABET, k=n))


async def _flood(url: str, bodies_and_keys: list[tuple[dict[str, object], str]]) -> list[int]:
    """POST each body with its key, CONCURRENCY at a time; the statuses, in order."""
    statuses = [0] * len(bodies_and_keys)
    queue = iter(enumerate(bodies_and_keys))
    timeout = aiohttp.ClientTimeout(total=10)

    async def worker(http: aiohttp.ClientSession) -> None:
        for i, (body, key) in queue:
            headers = {"Authorization": f"Bearer {key}"}
            async with http.post(url + "/v1/chat/completions", json=body,
                                 headers=headers) as answer:  # fmt: skip
                await answer.read()
                statuses[i] = answer.status

    async with aiohttp.ClientSession(timeout=timeout) as http, asyncio.timeout(120):
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
    return statuses


def _metrics(gw: Gateway) -> set[str]:
    return series(httpx.get(gw.url + "/metrics", timeout=10).text)


def _chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_junk_models_and_keys_add_at_most_two_series(gateway: Gateway) -> None:
    gateway.admin("POST", "/admin/tenants", {"name": "real"})
    key = str(gateway.admin("POST", "/admin/keys", {"tenant": "real"})["key"])
    assert asyncio.run(_flood(gateway.url, [(_chat(MODEL), key)])) == [200]
    before = _metrics(gateway)
    # Well-formed keys (so each is looked up) and malformed ones, each distinct.
    junk = [
        (_chat(f"junk-{_junk(12)}"),
         f"fs-{_junk(8)}-{_junk(43)}" if i % 2 else f"not-a-key-{_junk(20)}")
        for i in range(JUNK)
    ]  # fmt: skip
    statuses = asyncio.run(_flood(gateway.url, junk))
    assert set(statuses) == {401}
    after = _metrics(gateway)
    added = after - before
    assert len(added) <= 2, sorted(added)
    assert added == {
        'fleetserve_requests_total{model="-",status="401"}',
        'fleetserve_tenant_rejections_total{reason="invalid_key",tenant="-"}',
    }
    assert not any("junk" in s for s in after)

    # A valid key and junk model names: one series, model="other".
    statuses = asyncio.run(_flood(gateway.url, [(_chat(f"junk-{_junk(12)}"), key)
                                                for _ in range(2_000)]))  # fmt: skip
    assert set(statuses) == {404}
    again = _metrics(gateway)
    assert again - after == {'fleetserve_requests_total{model="other",status="404"}'}


def test_tenants_past_top_n_share_other(gateway: Gateway) -> None:
    keys = []
    for i in range(TOP_TENANTS + 4):
        gateway.admin("POST", "/admin/tenants", {"name": f"t{i}"})
        keys.append(str(gateway.admin("POST", "/admin/keys", {"tenant": f"t{i}"})["key"]))
    statuses = asyncio.run(_flood(gateway.url, [(_chat(MODEL), k) for k in keys * 3]))
    assert set(statuses) == {200}
    tenants = {
        m.group(1)
        for s in _metrics(gateway)
        if s.startswith("fleetserve_tenant_requests_total")
        and (m := re.search(r'tenant="([^"]*)"', s))
    }
    assert "other" in tenants
    assert len(tenants - {"other"}) <= TOP_TENANTS  # named: the first tenants this process saw
