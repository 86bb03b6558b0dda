"""The simulated engine's per-token path: the bytes of each streamed event, the order in which
one step's tokens are handed to their handlers (those that go on first, those that end last),
and what the server logs as a request's arrival."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
import pytest

from fleetserve.engines.sim.api import Job, StreamEvents, plan_request, stream_events
from fleetserve.engines.sim.engine import HAND_OUT_BATCH, SeqHandle, SimEngine
from fleetserve.engines.sim.profiles import PROFILES, SimProfile
from fleetserve.engines.sim.server import RECEIVED_S, SimServer
from fleetserve.engines.sim.text import TextSource
from fleetserve.testing.clock import FakeClock

MODEL = "sim-llama"
JOB_ID = 'chatcmpl-a"b'  # a quote, so the id must be JSON-escaped
CREATED = 1_700_000_000


def job_for(body: dict[str, Any], *, chat: bool) -> Job:
    plan = plan_request(
        orjson.dumps(body), chat=chat, model=MODEL, profile=PROFILES["a10g"], source=TextSource()
    )
    return Job(plan, JOB_ID, CREATED)


def expected_event(job: Job, i: int) -> bytes:
    """Event `i` as orjson renders OpenAI's chunk dict: the reference the fast path must match."""
    plan = job.plan
    pieces = plan.output.pieces
    text = pieces[i] if i < len(pieces) else ""
    finish = plan.output.finish_reason if i == plan.events - 1 else None
    choice: dict[str, Any]
    if plan.chat:
        delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    event: dict[str, Any] = {
        "id": JOB_ID,
        "object": "chat.completion.chunk" if plan.chat else "text_completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [choice],
    }
    if plan.include_usage:
        event["usage"] = None
    return b"data: " + orjson.dumps(event) + b"\n\n"


def chat_body(**extra: Any) -> dict[str, Any]:
    content = 'Say "hello" in one short sentence, é.'
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", **extra}


@pytest.mark.parametrize(
    ("body", "chat"),
    [
        pytest.param(chat_body(max_tokens=6, stream=True), True, id="chat"),
        pytest.param(chat_body(max_tokens=1, stream=True), True, id="chat-one-token"),
        pytest.param(
            chat_body(max_tokens=5, stream=True, stream_options={"include_usage": True}),
            True,
            id="chat-with-usage",
        ),
        pytest.param(chat_body(max_tokens=40, stream=True, stop=["the"]), True, id="chat-stop"),
        pytest.param(completion_body(max_tokens=6, stream=True), False, id="completion"),
        pytest.param(
            completion_body(max_tokens=3, stream=True, stream_options={"include_usage": True}),
            False,
            id="completion-with-usage",
        ),
    ],
)
def test_each_event_is_the_json_of_openai_chunk(body: dict[str, Any], chat: bool) -> None:
    job = job_for(body, chat=chat)
    events = StreamEvents(job)
    n = job.plan.events
    for i in range(n):
        assert events.events(i, i + 1) == expected_event(job, i), i
    whole = b"".join(expected_event(job, i) for i in range(n))
    assert events.events(0, n) == whole == stream_events(job, 0, n)
    for start, end in ((0, 2), (1, n), (n - 1, n), (2, 2)):
        if end <= n:
            expected = b"".join(expected_event(job, i) for i in range(start, end))
            assert events.events(start, end) == expected


def test_the_last_event_carries_finish_reason_and_the_end_says_done() -> None:
    job = job_for(chat_body(max_tokens=3, stream=True), chat=True)
    events = StreamEvents(job)
    last = orjson.loads(events.events(2, 3)[6:])
    assert last["choices"][0]["finish_reason"] == "length"
    assert events.end() == b"data: [DONE]\n\n"


# --- the order of hand-out inside one step ---------------------------------------------------

# A step is 10 ms + 1 ms per sampled sequence; prefill is fast enough not to matter here.
PROFILE = SimProfile(
    name="test",
    description="test profile",
    decode_base_s=0.010,
    decode_per_seq_s=0.001,
    prefill_tokens_per_s=1e6,
    max_num_seqs=8,
    max_num_batched_tokens=256,
    kv_capacity_tokens=1024,
    max_model_len=1024,
    cold_start_s=0.0,
)


async def follow(name: str, handle: SeqHandle, wakes: list[tuple[str, int, bool]]) -> None:
    """What a streaming handler does: wait for each token, note when it woke."""
    while not handle.finished:
        await handle.progress()
        wakes.append((name, handle.generated, handle.finished))


async def test_a_step_wakes_the_handlers_that_go_on_before_those_that_end() -> None:
    clock = FakeClock()
    engine = SimEngine(PROFILE, MODEL, clock)
    await engine.start()
    # Admitted in this order, so the scheduler produces a's token first in every step.
    lengths = {"a": 2, "b": 4, "c": 2, "d": 4}
    handles = {n: engine.submit([f"{n}{i}" for i in range(4)], k) for n, k in lengths.items()}
    wakes: list[tuple[str, int, bool]] = []
    tasks = [asyncio.create_task(follow(n, h, wakes)) for n, h in handles.items()]
    await clock.run_until_idle(max_s=60)
    await asyncio.gather(*tasks)
    await engine.stop()
    by_step: dict[int, list[tuple[str, bool]]] = {}
    for name, generated, finished in wakes:
        by_step.setdefault(generated, []).append((name, finished))
    assert by_step[1] == [("a", False), ("b", False), ("c", False), ("d", False)]
    # Step 2 ends a and c: b and d are woken (and write) first.
    assert by_step[2] == [("b", False), ("d", False), ("a", True), ("c", True)]
    assert by_step[4] == [("b", True), ("d", True)]
    assert all(h.seq.finish_reason == "length" for h in handles.values())


async def test_a_step_larger_than_one_batch_hands_out_every_token_on_time() -> None:
    clock = FakeClock()
    engine = SimEngine(dataclasses.replace(PROFILE, max_num_seqs=64), MODEL, clock)
    await engine.start()
    n = 2 * HAND_OUT_BATCH + 5  # three turns of the loop per step
    handles = [engine.submit([f"r{i}-{t}" for t in range(4)], 3) for i in range(n)]
    wakes: list[tuple[str, int, bool]] = []
    tasks = [asyncio.create_task(follow(str(i), h, wakes)) for i, h in enumerate(handles)]
    await clock.run_until_idle(max_s=60)
    await asyncio.gather(*tasks)
    await engine.stop()
    assert len(wakes) == 3 * n  # every handler woke once per token
    step_s = PROFILE.decode_step_s(n)
    for handle in handles:
        seq = handle.seq
        assert seq.finish_reason == "length"
        assert seq.first_token_s is not None
        assert seq.finished_s is not None
        assert seq.finished_s - seq.first_token_s == pytest.approx(2 * step_s)


# --- what the server logs about a request's arrival -------------------------------------------


async def call_with(
    app: SimServer, scope_extra: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    body = orjson.dumps(chat_body(max_tokens=2, stream=True))
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": headers, **scope_extra}  # fmt: skip
    await app(scope, receive, send)


@pytest.mark.parametrize(
    ("scope_extra", "headers", "arrival_s", "request_id"),
    [
        pytest.param(
            {RECEIVED_S: 99.5},
            [(b"x-request-id", b"bench-7")],
            99.5,
            "bench-7",
            id="stamped-by-the-server",
        ),
        pytest.param({}, [], 100.0, None, id="no-stamp-arrival-is-the-body-read"),
    ],
)
async def test_arrival_is_the_servers_stamp_when_it_gives_one(
    scope_extra: dict[str, Any],
    headers: list[tuple[bytes, bytes]],
    arrival_s: float,
    request_id: str | None,
) -> None:
    clock = FakeClock(start=100.0)
    engine = SimEngine(dataclasses.replace(PROFILES["instant"], cold_start_s=0.0), MODEL, clock)
    await engine.start()
    app = SimServer(engine)
    await call_with(app, scope_extra, headers)
    (row,) = app.requests.page()["requests"]
    assert (row["arrival_s"], row["body_read_s"], row["request_id"]) == (
        arrival_s,
        100.0,
        request_id,
    )
    await engine.stop()
