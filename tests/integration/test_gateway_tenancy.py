"""Tenancy at a real gateway (2 worker processes, auth = keys, SQLite in a temporary state
directory, limits in the real Redis under a prefix of its own) in front of sim engines:
every bad key and refusal gets OpenAI's error, the official `openai` client raises its typed
exceptions and reads the rate-limit headers, the admin API refuses bad names, concurrent
updates all land, a revoked key is refused by every worker within 1 s, and the ledger
charges what the engine reported."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from fleetserve.fleet.processes import free_port
from fleetserve.testing.stack import FAST_HEALTH_ENV, Service, fleetserve_argv, services
from tests.integration.redis_support import REDIS_URL, delete_prefix, random_prefix, require_redis

pytestmark = pytest.mark.integration

MODEL = "sim-t"
OTHER = "sim-other"
MESSAGES: Any = [{"role": "user", "content": "Tell me about fleets."}]


@dataclass
class Stack:
    url: str
    gateway: Service
    state_dir: Path

    def admin(self, method: str, path: str, body: object = None) -> httpx.Response:
        return httpx.request(method, self.url + path, json=body, timeout=10)

    def tenant(self, name: str, **fields: object) -> None:
        answer = self.admin("POST", "/admin/tenants", {"name": name, **fields})
        assert answer.status_code == 201, answer.text

    def key(self, tenant: str, **fields: object) -> dict[str, Any]:
        answer = self.admin("POST", "/admin/keys", {"tenant": tenant, **fields})
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created

    def ledger(self) -> list[sqlite3.Row]:
        with sqlite3.connect(self.state_dir / "fleetserve.db") as db:
            db.row_factory = sqlite3.Row
            return db.execute("SELECT * FROM usage ORDER BY started_at").fetchall()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("state")
    with services() as started:
        engines = []
        for name in (MODEL, OTHER):
            port = free_port()
            argv = fleetserve_argv("engine", "sim", "--port", str(port), "--model", name,
                                   "--profile", "h100", "--cold-start-s", "0")  # fmt: skip
            engines.append(started.start(name, argv, port))
        for engine in engines:
            engine.wait_ok("/health")
        fleet = state / "fleet.yaml"
        fleet.write_text(
            f"models:\n"
            f"  - name: {MODEL}\n    engine: sim\n    replicas: [{engines[0].url}]\n"
            f"    pricing: {{input_per_mtok_usd: 1000, output_per_mtok_usd: 2000}}\n"
            f"  - name: {OTHER}\n    engine: sim\n    replicas: [{engines[1].url}]\n"
        )
        port = free_port()
        argv = fleetserve_argv("gateway", "--port", str(port), "--fleet-file", str(fleet),
                               "--auth", "keys", "--workers", "2")  # fmt: skip
        asyncio.run(require_redis())
        prefix = random_prefix("gateway")
        env = {
            **FAST_HEALTH_ENV, "FLEETSERVE_STATE_DIR": str(state),
            "FLEETSERVE_REDIS_URL": REDIS_URL, "FLEETSERVE_TENANCY__REDIS_PREFIX": prefix,
        }  # fmt: skip
        gateway = started.start("gateway", argv, port, env)
        try:
            gateway.wait_ok("/ready")
            yield Stack(gateway.url, gateway, state)
        finally:
            asyncio.run(delete_prefix(prefix))


def _chat(stack: Stack, token: str | None, model: str = MODEL, **extra: object) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    body = {"model": model, "messages": MESSAGES, "max_tokens": 8, **extra}
    return httpx.post(stack.url + "/v1/chat/completions", json=body, headers=headers, timeout=20)


def _error(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def test_bad_keys_are_401_invalid_api_key(stack: Stack) -> None:
    stack.tenant("keys-t")
    good = stack.key("keys-t")["key"]
    expired = stack.key("keys-t", expires_in_s=1)["key"]
    revoked = stack.key("keys-t")
    assert stack.admin("POST", f"/admin/keys/{revoked['id']}/revoke").status_code == 200
    rotated = stack.key("keys-t")
    answer = stack.admin("POST", f"/admin/keys/{rotated['id']}/rotate", {"grace_s": 0})
    assert answer.status_code == 201
    assert _chat(stack, answer.json()["key"]).status_code == 200  # the new key works
    deadline = time.monotonic() + 5
    while _chat(stack, expired).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    unknown = "fs-ZZZZZZZZ-" + "a" * 43
    cases = {
        "missing": None, "malformed": "not-a-key", "unknown": unknown,
        "wrong secret": good[:-6] + "AAAAAA", "expired": expired, "revoked": revoked["key"],
        "rotated past grace": rotated["key"],
    }  # fmt: skip
    for case, token in cases.items():
        response = _chat(stack, token)
        assert response.status_code == 401, case
        assert _error(response)["code"] == "invalid_api_key", case
        assert _error(response)["type"] == "authentication_error", case
        if token and len(token) > 20:
            assert token[12:] not in response.text, case  # the secret is never echoed
    assert _chat(stack, good).status_code == 200


def test_models_a_tenant_may_not_use_are_403(stack: Stack) -> None:
    stack.tenant("narrow", models=[OTHER])
    token = stack.key("narrow")["key"]
    refused = _chat(stack, token, MODEL)
    assert refused.status_code == 403
    assert _error(refused)["code"] == "model_not_allowed"
    assert _chat(stack, token, OTHER).status_code == 200


def test_rpm_refusals_are_429_with_openai_headers(stack: Stack) -> None:
    stack.tenant("rpm-t", rpm=3)
    token = stack.key("rpm-t")["key"]
    answers = [_chat(stack, token) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    for answer in answers:
        assert answer.headers["x-ratelimit-limit-requests"] == "3"
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:3]] == ["2", "1", "0"]
    refused = answers[3]
    assert _error(refused)["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_an_exhausted_budget_is_429_insufficient_quota(stack: Stack) -> None:
    # $1000/$2000 per Mtok: a request with max_tokens 8 costs at most ~ $0.5 here
    stack.tenant("poor", budget_usd=0.2, budget_period="day")
    token = stack.key("poor")["key"]
    codes = []
    for _ in range(40):
        answer = _chat(stack, token)
        codes.append(answer.status_code)
        if answer.status_code == 429:
            assert _error(answer)["code"] == "insufficient_quota"
            break
    assert codes[-1] == 429
    spent = sum(r["cost_micro_usd"] for r in _rows_of(stack, "poor", len(codes) - 1))
    assert spent <= 200_000


def _rows_of(stack: Stack, tenant: str, count: int, timeout_s: float = 5) -> list[sqlite3.Row]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for r in stack.ledger() if r["tenant"] == tenant]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_a_budget_nearly_spent_caps_max_tokens(stack: Stack) -> None:
    # the prompt's worst case (its body's bytes) is ~$0.1: $0.4 is left for ~200 tokens
    stack.tenant("capped", budget_usd=0.5, budget_period="total")
    token = stack.key("capped")["key"]
    body = {"model": MODEL, "messages": MESSAGES}  # no max_tokens: the default cap is 4096
    answer = httpx.post(stack.url + "/v1/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {token}"}, timeout=20)  # fmt: skip
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    cost = usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000  # micro-dollars
    assert cost <= 500_000
    assert usage["completion_tokens"] < 400  # not the default 4096: capped to what is left


def test_streams_are_charged_the_engines_usage_which_the_client_does_not_see(
    stack: Stack,
) -> None:
    stack.tenant("streamer")
    token = stack.key("streamer")["key"]
    with httpx.stream(
        "POST", stack.url + "/v1/chat/completions", timeout=20,
        headers={"Authorization": f"Bearer {token}"},
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "stream": True},
    ) as response:  # fmt: skip
        text = "".join(response.iter_text())
        request_id = response.headers["x-request-id"]
    assert '"prompt_tokens"' not in text  # the usage chunk the gateway asked for is gone
    assert text.rstrip().endswith("data: [DONE]")
    (row,) = _rows_of(stack, "streamer", 1)
    assert row["request_id"] == request_id  # the answer names its ledger row
    assert row["completion_tokens"] == 12
    assert row["prompt_tokens"] > 0
    assert row["finish_reason"] == "length"
    assert row["usage_estimated"] == 0


@pytest.mark.parametrize(
    "name",
    ["x'; DROP TABLE tenants; --", "a" * 300, "", "../etc", "white space", "ünïcode"],
)
def test_bad_tenant_names_are_400(stack: Stack, name: str) -> None:
    answer = stack.admin("POST", "/admin/tenants", {"name": name})
    assert answer.status_code == 400, answer.text
    assert _error(answer)["type"] == "invalid_request_error"
    assert stack.admin("GET", "/admin/tenants").status_code == 200  # the table is still there


def test_admin_errors(stack: Stack) -> None:
    stack.tenant("dup")
    assert stack.admin("POST", "/admin/tenants", {"name": "dup"}).status_code == 409
    assert stack.admin("GET", "/admin/tenants/nobody").status_code == 404
    assert stack.admin("POST", "/admin/tenants", {"name": "w", "weight": -1}).status_code == 400
    assert stack.admin("POST", "/admin/tenants", {"name": "w", "bogus": 1}).status_code == 400
    answer = httpx.post(stack.url + "/admin/tenants", content=b"{nope", timeout=5)
    assert answer.status_code == 400
    assert stack.admin("POST", "/admin/keys", {"tenant": "nobody"}).status_code == 404


async def test_concurrent_updates_to_one_tenant_all_land(stack: Stack) -> None:
    stack.tenant("busy")
    fields = [("rpm", 11), ("tpm", 12_000), ("max_concurrent", 13), ("weight", 3.0),
              ("priority", "batch"), ("budget_usd", 14.0)]  # fmt: skip
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        answers = await asyncio.gather(
            *(client.patch("/admin/tenants/busy", json={k: v}) for k, v in fields * 3)
        )
        assert {a.status_code for a in answers} == {200}
        final = (await client.get("/admin/tenants/busy")).json()
    assert (final["rpm"], final["tpm"], final["max_concurrent"]) == (11, 12_000, 13)
    assert (final["weight"], final["priority"], final["budget"]["usd"]) == (3.0, "batch", 14.0)


async def test_a_revoked_key_is_refused_by_every_worker_within_a_second(stack: Stack) -> None:
    stack.tenant("revokee")
    created = stack.key("revokee")
    token = created["key"]
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10, headers=headers) as client:
        warm = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(16))
        )  # spread over both workers: each has the key cached now
        assert {a.status_code for a in warm} == {200}
        revoked = await client.post(f"/admin/keys/{created['id']}/revoke")
        assert revoked.status_code == 200
        at = time.monotonic()
        await asyncio.sleep(1.0)
        answers = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(32))
        )
        assert time.monotonic() - at < 1.5
    assert {a.status_code for a in answers} == {401}


def test_the_openai_client_raises_its_typed_errors(stack: Stack) -> None:
    stack.tenant("sdk", rpm=2, models=[MODEL])
    token = stack.key("sdk")["key"]
    with OpenAI(base_url=stack.url + "/v1", api_key=token, max_retries=0, timeout=20) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=4
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert raw.parse().choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model=OTHER, messages=MESSAGES, max_tokens=4)
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    with (
        OpenAI(base_url=stack.url + "/v1", api_key="fs-bad", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)


@pytest.fixture
async def aclient_token(stack: Stack) -> AsyncIterator[tuple[AsyncOpenAI, str]]:
    stack.tenant("sdk-async", rpm=1)
    token = stack.key("sdk-async")["key"]
    async with AsyncOpenAI(base_url=stack.url + "/v1", api_key=token, max_retries=0) as c:
        yield c, token


async def test_the_async_openai_client_too(aclient_token: tuple[AsyncOpenAI, str]) -> None:
    client, _ = aclient_token
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)  # the client asked for no usage
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)


def test_tenant_metrics_are_exposed(stack: Stack) -> None:
    stack.tenant("metered")
    token = stack.key("metered")["key"]
    assert _chat(stack, token).status_code == 200
    assert _chat(stack, None).status_code == 401
    deadline = time.monotonic() + 5
    while True:
        text = httpx.get(stack.url + "/metrics", timeout=5).text
        if 'fleetserve_tenant_requests_total{status="200",tenant="metered"}' in text:
            break
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.1)
    for name in ('fleetserve_tenant_tokens_total{kind="output",tenant="metered"}',
                 'fleetserve_tenant_rejections_total{reason="invalid_key",tenant="-"}',
                 "fleetserve_ledger_database_up", "fleetserve_ledger_spooled_rows_total",
                 "fleetserve_limiter_shared_up"):  # fmt: skip
        assert name in text, name
