"""The simulated engine's OpenAI surface, called in-process through its ASGI app."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from fleetserve.engines.sim.api import PlanCache
from fleetserve.engines.sim.engine import SimEngine
from fleetserve.engines.sim.profiles import PROFILES, SimProfile
from fleetserve.engines.sim.server import SimServer
from fleetserve.engines.sim.text import (
    CHAT_MESSAGE_OVERHEAD_TOKENS,
    CHAT_PRIMING_TOKENS,
    COMPLETION_BOS_TOKENS,
    TextSource,
    count_tokens,
)
from fleetserve.engines.vllm import parse_vllm_signals
from fleetserve.protocol.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ErrorResponse,
    ModelList,
)
from fleetserve.testing.clock import FakeClock

MODEL = "sim-llama"
Message = MutableMapping[str, Any]


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[Any]:
        """The JSON data of each SSE event, without the final [DONE]."""
        datas = [line[6:] for line in self.body.split(b"\n") if line.startswith(b"data: ")]
        assert datas[-1] == b"[DONE]", self.body[-200:]
        return [orjson.loads(d) for d in datas[:-1]]


async def call(
    app: SimServer,
    method: str,
    path: str,
    body: bytes | dict[str, Any] = b"",
    *,
    disconnect: asyncio.Event | None = None,
    on_body: Callable[[bytes], Awaitable[None]] | None = None,
) -> Reply:
    """One HTTP exchange with the ASGI app. The client 'disconnects' when `disconnect` is set."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    reply = Reply()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await (disconnect or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            reply.body += message.get("body", b"")
            if on_body is not None:
                await on_body(message.get("body", b""))

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    await app(scope, receive, send)
    return reply


@pytest.fixture
async def app() -> AsyncIterator[SimServer]:
    engine = SimEngine(PROFILES["instant"], MODEL, FakeClock())
    await engine.start()
    yield SimServer(engine)
    await engine.stop()


def chat(content: str = "Say hello in one short sentence.", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def completion(prompt: str | list[list[int]] = "Once upon a time", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, **extra}


def chat_prompt_tokens(*contents: str) -> int:
    per_message = (CHAT_MESSAGE_OVERHEAD_TOKENS + count_tokens(c) for c in contents)
    return CHAT_PRIMING_TOKENS + sum(per_message)


async def test_chat_completion_has_openai_shape_and_consistent_usage(app: SimServer) -> None:
    reply = await call(app, "POST", "/v1/chat/completions", chat(max_tokens=12))
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    data = reply.json()
    assert set(data) == {"id", "object", "created", "model", "choices", "usage"}
    assert data["id"].startswith("chatcmpl-")
    assert (data["object"], data["model"]) == ("chat.completion", MODEL)
    assert isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    text = choice["message"]["content"]
    usage = data["usage"]
    assert usage["completion_tokens"] == count_tokens(text) == 12
    assert usage["prompt_tokens"] == chat_prompt_tokens("Say hello in one short sentence.")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    ChatCompletion.model_validate(data)


async def test_completion_has_openai_shape_and_consistent_usage(app: SimServer) -> None:
    reply = await call(app, "POST", "/v1/completions", completion(max_tokens=7))
    data = reply.json()
    assert reply.status == 200
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    (choice,) = data["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert data["usage"]["completion_tokens"] == count_tokens(choice["text"]) == 7
    assert data["usage"]["prompt_tokens"] == COMPLETION_BOS_TOKENS + count_tokens(
        "Once upon a time"
    )
    Completion.model_validate(data)


async def test_completions_default_to_16_tokens_and_chat_to_a_natural_end(app: SimServer) -> None:
    legacy = (await call(app, "POST", "/v1/completions", completion())).json()
    assert legacy["usage"]["completion_tokens"] == 16
    natural = (await call(app, "POST", "/v1/chat/completions", chat())).json()
    assert natural["choices"][0]["finish_reason"] == "stop"
    assert 16 <= natural["usage"]["completion_tokens"] <= 256


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream_sends_one_token_per_chunk(app: SimServer, include_usage: bool) -> None:
    body = chat(max_tokens=9, stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    reply = await call(app, "POST", "/v1/chat/completions", body)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = reply.events()
    chunks = events[:-1] if include_usage else events
    assert len(chunks) == 9
    for i, event in enumerate(chunks):
        ChatCompletionChunk.model_validate(event)
        assert event["object"] == "chat.completion.chunk"
        (choice,) = event["choices"]
        assert count_tokens(choice["delta"]["content"]) == 1
        assert ("role" in choice["delta"]) == (i == 0)
        assert choice["finish_reason"] == ("length" if i == 8 else None)
        assert ("usage" in event) == include_usage
        if include_usage:
            assert event["usage"] is None
    assert len({e["id"] for e in events}) == 1
    if include_usage:
        final = events[-1]
        assert final["choices"] == []
        assert final["usage"]["completion_tokens"] == 9
    streamed = "".join(e["choices"][0]["delta"]["content"] for e in chunks)
    whole = (await call(app, "POST", "/v1/chat/completions", chat(max_tokens=9))).json()
    assert streamed == whole["choices"][0]["message"]["content"]


async def test_completion_stream_sends_text_completion_events(app: SimServer) -> None:
    body = completion(max_tokens=4, stream=True, stream_options={"include_usage": True})
    events = (await call(app, "POST", "/v1/completions", body)).events()
    assert [e["object"] for e in events] == ["text_completion"] * 5
    assert [count_tokens(e["choices"][0]["text"]) for e in events[:4]] == [1, 1, 1, 1]
    assert events[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("as_list", [False, True])
async def test_stop_sequence_ends_the_text_before_it(app: SimServer, as_list: bool) -> None:
    free = (await call(app, "POST", "/v1/chat/completions", chat(max_tokens=30))).json()
    text = free["choices"][0]["message"]["content"]
    stop = text.split(" ")[5]  # the sixth word
    cut = text.index(stop)
    stops: str | list[str] = ["never-in-the-vocabulary", stop] if as_list else stop
    data = (await call(app, "POST", "/v1/chat/completions", chat(max_tokens=30, stop=stops))).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == text[:cut]
    assert data["usage"]["completion_tokens"] == count_tokens(text[:cut])
    events = (
        await call(
            app, "POST", "/v1/chat/completions", chat(max_tokens=30, stop=stops, stream=True)
        )
    ).events()
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == text[:cut]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_text_is_deterministic_per_seed_and_prompt(app: SimServer) -> None:
    async def text_of(body: dict[str, Any]) -> str:
        data = (await call(app, "POST", "/v1/chat/completions", body)).json()
        return str(data["choices"][0]["message"]["content"])

    assert await text_of(chat(max_tokens=20)) == await text_of(chat(max_tokens=20))
    assert await text_of(chat("a", max_tokens=20)) != await text_of(chat("b", max_tokens=20))
    seeded = chat("a", max_tokens=20, seed=7)
    assert await text_of(seeded) == await text_of(chat("b", max_tokens=20, seed=7))
    assert await text_of(seeded) != await text_of(chat("a", max_tokens=20, seed=8))


async def test_repeated_bodies_get_their_own_ids_and_the_same_text(app: SimServer) -> None:
    first = (await call(app, "POST", "/v1/chat/completions", chat(max_tokens=4))).json()
    second = (await call(app, "POST", "/v1/chat/completions", chat(max_tokens=4))).json()
    assert first["id"] != second["id"]
    assert first["choices"] == second["choices"]
    version = (await call(app, "GET", "/version")).json()
    assert version["simulated"] is True


def test_plans_are_remembered_from_a_bodys_second_sighting() -> None:
    cache = PlanCache(model=MODEL, profile=PROFILES["instant"], source=TextSource())
    body = orjson.dumps(chat(max_tokens=3))
    first, second, third = (cache.plan(body, chat=True) for _ in range(3))
    assert first == second == third
    assert first is not second
    assert second is third
    both = orjson.dumps({**chat(max_tokens=3), "prompt": "hi"})  # valid for either endpoint
    cache.plan(both, chat=True)
    cache.plan(both, chat=True)
    assert cache.plan(both, chat=False).chat is False  # the endpoint is part of the key


async def test_max_completion_tokens_wins_over_max_tokens(app: SimServer) -> None:
    body = chat(max_tokens=5, max_completion_tokens=3, temperature=0.2, top_p=0.9, user="u")
    data = (await call(app, "POST", "/v1/chat/completions", body)).json()
    assert data["usage"]["completion_tokens"] == 3


async def test_unknown_fields_are_accepted_as_vllm_does(app: SimServer) -> None:
    body = chat(max_tokens=2, top_k=5, repetition_penalty=1.1, ignore_eos=True)
    assert (await call(app, "POST", "/v1/chat/completions", body)).status == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [
        pytest.param("/v1/chat/completions", b"{not json", 400, None, None, id="bad-json"),
        pytest.param("/v1/chat/completions", b"[1, 2]", 400, None, None, id="not-an-object"),
        pytest.param("/v1/chat/completions", {"model": MODEL}, 400, None, "messages",
                     id="no-messages"),
        pytest.param("/v1/chat/completions", chat(max_tokens=0), 400, None, "max_tokens",
                     id="zero-max-tokens"),
        pytest.param("/v1/chat/completions", chat(temperature=3), 400, None, "temperature",
                     id="temperature-out-of-range"),
        pytest.param("/v1/chat/completions", {**chat(), "model": "gpt-4o"}, 404,
                     "model_not_found", "model", id="wrong-model"),
        pytest.param("/v1/chat/completions", chat(n=2), 400, None, "n", id="n-above-one"),
        pytest.param("/v1/chat/completions",
                     chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, None,
                     "tools", id="tools"),
        pytest.param("/v1/chat/completions", chat(logprobs=True), 400, None, "logprobs",
                     id="logprobs"),
        pytest.param("/v1/chat/completions", chat(response_format={"type": "json_object"}), 400,
                     None, "response_format", id="json-mode"),
        pytest.param("/v1/chat/completions", chat(stream_options={"include_usage": True}), 400,
                     None, "stream_options", id="stream-options-without-stream"),
        pytest.param("/v1/chat/completions", chat(max_tokens=5000), 400, None, "max_tokens",
                     id="beyond-context"),
        pytest.param("/v1/chat/completions",
                     {"model": MODEL, "messages": [{"role": "user", "content": [
                         {"type": "image_url", "image_url": {"url": "x"}}]}]},
                     400, None, "messages", id="image-content"),
        pytest.param("/v1/completions", completion(echo=True), 400, None, "echo", id="echo"),
        pytest.param("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, None,
                     "prompt", id="several-prompts"),
    ],
)  # fmt: skip
async def test_refused_requests_get_openai_error_envelopes(
    path: str, body: bytes | dict[str, Any], status: int, code: str | None, param: str | None
) -> None:
    engine = SimEngine(dataclasses.replace(PROFILES["instant"], max_model_len=4096), MODEL,
                       FakeClock())  # fmt: skip
    reply = await call(SimServer(engine), "POST", path, body)
    assert reply.status == status, reply.body
    error = ErrorResponse.model_validate(reply.json()).error
    assert error.type == "invalid_request_error"
    assert error.code == code
    assert error.param == param
    assert engine.stats.finished == {"stop": 0, "length": 0, "abort": 0}


async def test_prompts_as_token_ids_count_as_given(app: SimServer) -> None:
    data = (
        await call(app, "POST", "/v1/completions", completion(prompt=[[1, 2, 3, 4]], max_tokens=2))
    ).json()
    assert data["usage"]["prompt_tokens"] == 4


async def test_models_card_says_it_is_a_simulation(app: SimServer) -> None:
    reply = await call(app, "GET", "/v1/models")
    cards = ModelList.model_validate(reply.json()).data
    assert [c.id for c in cards] == [MODEL]
    card = reply.json()["data"][0]
    assert card["owned_by"] == "fleetserve-sim"
    assert card["simulated"] is True
    assert "SIMULATED" in card["simulation"]["note"]


async def test_unknown_route_and_wrong_method(app: SimServer) -> None:
    assert (await call(app, "GET", "/v2/nothing")).status == 404
    assert (await call(app, "GET", "/v1/chat/completions")).status == 405
    assert (await call(app, "POST", "/health")).status == 405


async def test_health_is_503_until_the_cold_start_is_over() -> None:
    clock = FakeClock()
    engine = SimEngine(dataclasses.replace(PROFILES["instant"], cold_start_s=30.0), MODEL, clock)
    await engine.start()
    app = SimServer(engine)
    starting = await call(app, "GET", "/health")
    assert starting.status == 503
    assert starting.headers["retry-after"] == "30"
    assert (await call(app, "POST", "/v1/chat/completions", chat())).status == 503
    await clock.advance(30.0)
    assert (await call(app, "GET", "/health")).status == 200
    await engine.stop()


async def test_metrics_report_vllm_names_and_parse_back(app: SimServer) -> None:
    await call(app, "POST", "/v1/chat/completions", chat(max_tokens=5))
    reply = await call(app, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    for name in (
        "vllm:num_requests_running{",
        "vllm:kv_cache_usage_perc{",
        "vllm:gpu_cache_usage_perc{",
        "vllm:prompt_tokens_total{",
        'vllm:generation_tokens_total{engine="0",model_name="sim-llama"} 5.0',
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="sim-llama"} '
        "1.0",
        "vllm:prefix_cache_queries_total{",
        "vllm:prefix_cache_hits_total{",
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="sim-llama"} 1.0',
        "vllm:e2e_request_latency_seconds_count{",
        "vllm:inter_token_latency_seconds_bucket{",
        "vllm:time_per_output_token_seconds_bucket{",
        "vllm:request_queue_time_seconds_sum{",
        "vllm:request_prefill_time_seconds_sum{",
        "vllm:request_decode_time_seconds_sum{",
    ):
        assert name in text, name
    signals = parse_vllm_signals(text)
    assert (signals.running, signals.waiting, signals.kv_usage_frac) == (0.0, 0.0, 0.0)


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


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_the_request_in_the_engine(stream: bool) -> None:
    clock = FakeClock()
    engine = SimEngine(SLOW, MODEL, clock)
    await engine.start()
    app = SimServer(engine)
    gone = asyncio.Event()
    request = asyncio.create_task(
        call(app, "POST", "/v1/chat/completions", chat(max_tokens=500, stream=stream),
             disconnect=gone)
    )  # fmt: skip
    await clock.advance(0.5)  # about 50 tokens in
    assert engine.gauges().running == 1
    gone.set()
    reply = await request
    assert engine.gauges().running == 0
    assert engine.gauges().kv_usage_frac == 0.0
    assert engine.stats.finished["abort"] == 1
    if stream:
        assert 40 <= reply.body.count(b"data: ") <= 60
    await clock.run_until_idle(max_s=60)
    await engine.stop()


async def test_streamed_tokens_arrive_as_the_engine_makes_them() -> None:
    clock = FakeClock()
    engine = SimEngine(SLOW, MODEL, clock)
    await engine.start()
    app = SimServer(engine)
    arrivals: list[float] = []

    async def on_body(chunk: bytes) -> None:
        arrivals.extend([clock.now()] * chunk.count(b'"content"'))

    request = asyncio.create_task(
        call(app, "POST", "/v1/chat/completions", chat(max_tokens=5, stream=True),
             on_body=on_body)
    )  # fmt: skip
    await clock.run_until_idle(max_s=60)
    await request
    assert arrivals == pytest.approx([0.0115, 0.0215, 0.0315, 0.0415, 0.0515], abs=1e-3)
    await engine.stop()
