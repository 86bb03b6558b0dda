"""The simulated engine's own per-request timing: the ring buffer, and the server that fills it
and serves it at /sim/requests (called in-process through its ASGI app, on a FakeClock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import orjson
import pytest

from fleetserve.engines.sim.engine import SimEngine
from fleetserve.engines.sim.profiles import PROFILES, SimProfile
from fleetserve.engines.sim.request_log import RequestLog
from fleetserve.engines.sim.server import SimServer
from fleetserve.testing.clock import FakeClock

MODEL = "sim-llama"
Message = MutableMapping[str, Any]

# 10 ms per decode step whatever the batch, prefill at 10k tokens/s: easy numbers to check.
SLOW = SimProfile(
    name="slow",
    description="test",
    decode_base_s=0.010,
    decode_per_seq_s=0.0,
    prefill_tokens_per_s=10_000.0,
    max_num_seqs=8,
    max_num_batched_tokens=2048,
    kv_capacity_tokens=4096,
    max_model_len=2048,
    cold_start_s=0.0,
)


def log_of(n: int, capacity: int = 100) -> RequestLog:
    log = RequestLog(capacity)
    for i in range(n):
        log.record(float(i), i + 0.5, i + 0.9, 3, None, None, 10, 5, "length", True)
    return log


# --- the ring buffer ------------------------------------------------------------------------


def test_the_ring_keeps_the_newest_and_says_how_many_a_reader_missed() -> None:
    log = log_of(7, capacity=3)
    assert len(log) == 3
    page = log.page()
    assert [r["id"] for r in page["requests"]] == [5, 6, 7]
    assert (page["missed"], page["next"], page["capacity"]) == (4, 7, 3)
    assert log.page(after_id=5)["missed"] == 0
    assert [r["id"] for r in log.page(after_id=5)["requests"]] == [6, 7]


@pytest.mark.parametrize(
    ("after_id", "limit", "ids", "next_id"),
    [
        pytest.param(0, None, [1, 2, 3, 4, 5], 5, id="all"),
        pytest.param(2, None, [3, 4, 5], 5, id="since"),
        pytest.param(2, 2, [3, 4], 4, id="since-and-limit"),
        pytest.param(0, 0, [], 0, id="limit-zero"),
        pytest.param(5, None, [], 5, id="nothing-new"),
        pytest.param(99, None, [], 99, id="cursor-ahead"),
    ],
)
def test_pages_follow_the_cursor(
    after_id: int, limit: int | None, ids: list[int], next_id: int
) -> None:
    page = log_of(5).page(after_id, limit)
    assert [r["id"] for r in page["requests"]] == ids
    assert page["next"] == next_id


def test_clear_empties_it_and_ids_go_on() -> None:
    log = log_of(4)
    assert log.clear() == 4
    assert log.page()["requests"] == []
    log.record(1.0, 1.1, 1.2, 1, None, None, 3, 1, "stop", True)
    assert [r["id"] for r in log.page(after_id=4)["requests"]] == [5]


@pytest.mark.parametrize(
    ("entry", "ttft_s", "tpot_s", "e2e_s"),
    [
        pytest.param((10.0, 10.2, 11.2, 6, 5, True), 0.2, 0.25, 1.2, id="stream"),
        pytest.param((10.0, 10.2, 10.2, 1, 1, True), 0.2, None, 0.2, id="one-token"),
        pytest.param((10.0, 10.5, 10.5, 1, 5, False), None, None, 0.5, id="buffered"),
        pytest.param((10.0, None, None, 0, 0, True), None, None, None, id="nothing-written"),
        pytest.param((10.0, 10.1, 10.3, 2, 0, True), None, None, 0.3, id="no-tokens"),
    ],
)
def test_derived_latencies(
    entry: tuple[float, float | None, float | None, int, int, bool],
    ttft_s: float | None,
    tpot_s: float | None,
    e2e_s: float | None,
) -> None:
    arrival, first, last, writes, tokens, stream = entry
    log = RequestLog()
    log.record(arrival, first, last, writes, None, None, 7, tokens, "length", stream)
    (row,) = log.page()["requests"]
    assert row["ttft_s"] == (None if ttft_s is None else pytest.approx(ttft_s))
    assert row["tpot_s"] == (None if tpot_s is None else pytest.approx(tpot_s))
    assert row["e2e_s"] == (None if e2e_s is None else pytest.approx(e2e_s))


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RequestLog(0)


# --- the server records what it wrote --------------------------------------------------------


async def call(
    app: SimServer,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    query: bytes = b"",
    gone: asyncio.Event | None = None,
) -> tuple[int, bytes]:
    raw = b"" if body is None else orjson.dumps(body)
    status = 0
    out = b""
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await (gone or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, out
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            out += message.get("body", b"")

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": query}
    await app(scope, receive, send)
    return status, out


async def requests_logged(app: SimServer, query: bytes = b"") -> list[dict[str, Any]]:
    status, body = await call(app, "GET", "/sim/requests", query=query)
    assert status == 200
    page = orjson.loads(body)
    assert page["simulated"] is True
    rows: list[dict[str, Any]] = page["requests"]
    return rows


@pytest.fixture
async def slow() -> AsyncIterator[tuple[SimServer, FakeClock]]:
    clock = FakeClock(start=1000.0)
    engine = SimEngine(SLOW, MODEL, clock)
    await engine.start()
    yield SimServer(engine), clock
    await engine.stop()


def chat(max_tokens: int, *, stream: bool) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": stream}


async def test_a_stream_is_timed_at_its_writes(slow: tuple[SimServer, FakeClock]) -> None:
    app, clock = slow
    await clock.advance(0.25)  # arrival is not the engine's start
    request = asyncio.create_task(call(app, "POST", "/v1/chat/completions", chat(5, stream=True)))
    await clock.run_until_idle(max_s=60)
    status, body = await request
    assert status == 200
    (row,) = await requests_logged(app)
    prompt_tokens = row["prompt_tokens"]
    assert prompt_tokens > 0
    prefill_s = prompt_tokens / SLOW.prefill_tokens_per_s
    assert row["arrival_s"] == pytest.approx(1000.25)
    assert row["ttft_s"] == pytest.approx(prefill_s + 0.010)
    assert row["tpot_s"] == pytest.approx(0.010)
    assert row["e2e_s"] == pytest.approx(prefill_s + 0.050)
    assert row["engine_first_token_s"] == pytest.approx(row["first_write_s"])
    assert row["engine_finished_s"] == pytest.approx(row["last_write_s"])
    assert (row["writes"], row["output_tokens"], row["finish_reason"], row["stream"]) == (
        5, 5, "length", True,
    )  # fmt: skip
    assert body.count(b'"content"') == 5


async def test_a_buffered_answer_has_no_ttft(slow: tuple[SimServer, FakeClock]) -> None:
    app, clock = slow
    request = asyncio.create_task(call(app, "POST", "/v1/chat/completions", chat(4, stream=False)))
    await clock.run_until_idle(max_s=60)
    assert (await request)[0] == 200
    (row,) = await requests_logged(app)
    assert (row["ttft_s"], row["tpot_s"], row["writes"], row["stream"]) == (None, None, 1, False)
    assert row["e2e_s"] == pytest.approx(row["prompt_tokens"] / 10_000 + 0.040)
    assert row["output_tokens"] == 4


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_leaves_is_logged_as_a_disconnect(
    slow: tuple[SimServer, FakeClock], stream: bool
) -> None:
    app, clock = slow
    gone = asyncio.Event()
    request = asyncio.create_task(
        call(app, "POST", "/v1/chat/completions", chat(500, stream=stream), gone=gone)
    )
    await clock.advance(0.2)
    gone.set()
    await request
    (row,) = await requests_logged(app)
    assert row["finish_reason"] == "disconnect"
    assert row["engine_finished_s"] is None or row["engine_finished_s"] <= clock.now()
    if stream:
        assert 15 <= row["output_tokens"] == row["writes"] <= 20
    else:
        assert (row["output_tokens"], row["writes"], row["e2e_s"]) == (0, 0, None)


async def test_instant_streams_write_everything_at_once() -> None:
    engine = SimEngine(PROFILES["instant"], MODEL, FakeClock())
    await engine.start()
    app = SimServer(engine)
    await call(app, "POST", "/v1/chat/completions", chat(16, stream=True))
    (row,) = await requests_logged(app)
    assert (row["ttft_s"], row["tpot_s"], row["writes"], row["output_tokens"]) == (0, 0, 1, 16)
    await engine.stop()


async def test_refused_requests_are_not_logged(slow: tuple[SimServer, FakeClock]) -> None:
    app, _ = slow
    status, _ = await call(app, "POST", "/v1/chat/completions", {**chat(3, stream=True),
                                                                  "model": "other"})  # fmt: skip
    assert status == 404
    assert await requests_logged(app) == []


async def test_the_route_pages_clears_and_refuses(slow: tuple[SimServer, FakeClock]) -> None:
    app, clock = slow
    for _ in range(3):
        task = asyncio.create_task(call(app, "POST", "/v1/completions", {
            "model": MODEL, "prompt": "Once", "max_tokens": 2, "stream": True}))  # fmt: skip
        await clock.run_until_idle(max_s=60)
        await task
    assert [r["id"] for r in await requests_logged(app, b"since=1")] == [2, 3]
    assert [r["id"] for r in await requests_logged(app, b"since=1&limit=1")] == [2]
    assert (await call(app, "GET", "/sim/requests", query=b"since=-1"))[0] == 400
    assert (await call(app, "GET", "/sim/requests", query=b"limit=x"))[0] == 400
    assert (await call(app, "POST", "/sim/requests"))[0] == 405
    status, body = await call(app, "DELETE", "/sim/requests")
    assert (status, orjson.loads(body)) == (200, {"cleared": 3})
    assert await requests_logged(app) == []


def test_cleared_entries_are_not_reported_as_missed() -> None:
    log = log_of(5, capacity=3)
    assert log.page()["missed"] == 2
    log.clear()
    for i in range(4):
        log.record(float(i), None, None, 0, None, None, 1, 0, "disconnect", True)
    page = log.page()
    assert [r["id"] for r in page["requests"]] == [7, 8, 9]
    assert page["missed"] == 1  # id 6 fell out of the ring; 1-5 were cleared
