"""The official `openai` client against the gateway in front of sim engine processes.

Everything a client of OpenAI's API relies on: the typed responses, streaming with usage,
stop sequences, max_tokens, the model list, and errors raised as the client's own exception
classes. The engines use the h100 profile (about 6 ms per token) so that streams are real
streams and a long request can outlast a client timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from fleetserve.fleet.processes import free_port
from fleetserve.testing.stack import Service, SimStack, gateway_argv, services, sim_stack

pytestmark = pytest.mark.integration

MODEL = "sim-llama"
MAX_BODY_BYTES = 16 * 1024
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about fleets."}]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def stack() -> Iterator[SimStack]:
    with sim_stack(
        2,
        model=MODEL,
        profile="h100",
        gateway_env={"FLEETSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES)},
    ) as running:
        yield running


@pytest.fixture
def client(stack: SimStack) -> Iterator[OpenAI]:
    with OpenAI(base_url=stack.url + "/v1", api_key="sk-test", max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture
async def aclient(stack: SimStack) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=stack.url + "/v1", api_key="sk-test", max_retries=0, timeout=20
    ) as c:
        yield c


def test_models_list(client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_chat_non_stream(client: OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    usage = reply.usage
    assert usage is not None
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_non_stream(client: OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7)
    assert reply.object == "text_completion"
    assert reply.choices[0].text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


def test_chat_stream_with_usage_matches_non_stream(client: OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *content, last = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in content)
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 16
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert whole.usage is not None
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == whole.choices[0].message.content  # same text on every replica, both ways
    assert [c.choices[0].finish_reason for c in content][-1] == "length"


def test_stream_without_usage_has_no_usage_chunk(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=5,
        stream=True,
    )
    chunks = list(stream)
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequence(client: OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)
    text = full.choices[0].message.content
    assert text
    words = text.split()
    stop = words[len(words) // 2]
    expected = text[: text.find(stop)]
    cut = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=24,
        stop=[stop],
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == expected
    assert cut.usage is not None
    assert cut.usage.completion_tokens < 24
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=24,
        stop=stop,
        stream=True,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_async_chat_stream_with_usage(aclient: AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        else:
            pieces.append(chunk.choices[0].delta.content or "")
    assert usage is not None
    assert usage.completion_tokens == 9
    assert usage.total_tokens == usage.prompt_tokens + 9
    assert len(pieces) == 9  # one token per event
    assert "".join(pieces)


async def test_async_completion_stream_and_non_stream(aclient: AsyncOpenAI) -> None:
    whole = await aclient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10)
    stream = await aclient.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 10
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert text == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_async_concurrent_requests_spread_over_replicas(
    aclient: AsyncOpenAI, stack: SimStack
) -> None:
    models = await aclient.models.list()
    assert [m.id for m in models.data] == [MODEL]
    raws = await asyncio.gather(
        *(
            aclient.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=8
            )
            for _ in range(8)
        )
    )
    for raw in raws:
        reply = raw.parse()
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 8
    served = {raw.headers["x-fleetserve-replica"] for raw in raws}
    assert served == {stack.replica_id(e) for e in stack.engines}


def test_unknown_model_is_not_found_error(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        pytest.param({"max_tokens": 0}, "max_tokens", id="max-tokens-zero"),  # the gateway's 400
        pytest.param({"n": 2}, "n", id="n-2"),  # the engine's 400, passed through
    ],
)
def test_invalid_parameters_are_bad_request_error(
    client: OpenAI, extra: dict[str, int], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, **extra)  # type: ignore[call-overload]
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"


async def test_async_invalid_parameter_is_bad_request_error(aclient: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await aclient.completions.create(model=MODEL, prompt=PROMPT, n=2)


def test_huge_body_is_413(client: OpenAI) -> None:
    huge: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "x" * (MAX_BODY_BYTES * 2)}
    ]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=huge)
    assert info.value.status_code == 413
    assert info.value.code == "payload_too_large"


def test_client_timeout_is_api_timeout_error(stack: SimStack) -> None:
    # 2,000 tokens at ~6 ms each take ~12 s; the client gives up after 0.5 s.
    with (
        OpenAI(base_url=stack.url + "/v1", api_key="sk-test", max_retries=0, timeout=0.5) as c,
        pytest.raises(openai.APITimeoutError),
    ):
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2000)
    with OpenAI(base_url=stack.url + "/v1", api_key="sk-test", max_retries=0, timeout=10) as c:
        reply = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert reply.choices[0].finish_reason == "length"  # and the gateway carries on


def test_no_ready_replica_is_internal_server_error_503() -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with services() as started:
        port = free_port()
        gateway = started.start("gateway", gateway_argv(port, MODEL, [closed]), port)
        gateway.wait_ok("/health")
        with (
            OpenAI(base_url=gateway.url + "/v1", api_key="sk-test", max_retries=0) as c,
            pytest.raises(openai.InternalServerError) as info,
        ):
            c.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert info.value.status_code == 503
        assert info.value.code == "no_replica_available"
        assert info.value.response.headers.get("retry-after")


def read_then_crash(stream: Iterable[object], engine: Service, after: int) -> None:
    for received, _ in enumerate(stream, start=1):
        if received == after:
            engine.crash()


def test_stream_cut_by_a_dying_replica_raises_api_error() -> None:
    # Its own stack: the replica is killed. ~2,000 tokens at ~6 ms each outlast the test.
    with (
        sim_stack(1, model=MODEL, profile="h100") as own,
        OpenAI(base_url=own.url + "/v1", api_key="sk-test", max_retries=0, timeout=20) as c,
    ):
        stream = c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2000, stream=True
        )
        with pytest.raises(openai.APIError) as info:
            read_then_crash(stream, own.engines[0], after=3)
        assert not isinstance(info.value, openai.APIStatusError)  # in-stream, not a status
        assert info.value.code == "upstream_stream_error"
        assert info.value.type == "server_error"
        assert info.value.message
