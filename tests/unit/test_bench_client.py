"""Bench's client against scripted SSE servers on 127.0.0.1, with KNOWN chunk times.

The server and the client share one event loop and one FakeClock: the script sets the clock
to a chunk's time, writes the chunk, and gives the client a real moment to read it before the
next step, so each read is stamped with exactly the scripted time.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import orjson
import pytest

from fleetserve.bench.client import BenchClient, ClientSettings
from fleetserve.bench.records import RequestRecord
from fleetserve.bench.workload import BuiltRequest
from fleetserve.fleet.processes import free_port
from fleetserve.testing.clock import FakeClock

DELIVERY_S = 0.01  # real time given to the client to read each write on loopback


@dataclass(frozen=True)
class At:
    t_s: float


@dataclass(frozen=True)
class Send:
    data: bytes  # one chunk of the chunked body


@dataclass(frozen=True)
class Raw:
    data: bytes  # bytes as they are (a whole response, or a head)


@dataclass(frozen=True)
class Stall:
    real_s: float


@dataclass(frozen=True)
class Cut:
    """Drop the connection."""


Step = At | Send | Raw | Stall | Cut

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"x-fleetserve-replica: replica-7\r\n\r\n"
)
END = Raw(b"0\r\n\r\n")


def data(event: object) -> bytes:
    return b"data: " + (b"[DONE]" if event == "[DONE]" else orjson.dumps(event)) + b"\n\n"


def chat(content: str | None = None, *, role: bool = False, **delta: str) -> bytes:
    body: dict[str, object] = dict(delta)
    if role:
        body["role"] = "assistant"
    if content is not None:
        body["content"] = content
    return data({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": body}]})


def usage(prompt: int, completion: int) -> bytes:
    counts = {"prompt_tokens": prompt, "completion_tokens": completion}
    return data({"choices": [], "usage": counts})


DONE = data("[DONE]")


def http_error(status: str, body: bytes) -> Raw:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
    return Raw(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


class Server:
    """Answers every request with a script; remembers the request heads."""

    def __init__(self, clock: FakeClock, script: list[Step]) -> None:
        self.clock = clock
        self.script = script
        self.heads: list[bytes] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            for step in self.script:
                if isinstance(step, At):
                    await self.clock.advance(step.t_s - self.clock.now())
                elif isinstance(step, Stall):
                    await asyncio.sleep(step.real_s)
                elif isinstance(step, Cut):
                    writer.transport.abort()
                    return
                else:
                    raw = step.data if isinstance(step, Raw) else b"%x\r\n%s\r\n" % (
                        len(step.data), step.data)  # fmt: skip
                    writer.write(raw)
                    await writer.drain()
                    await asyncio.sleep(DELIVERY_S)
            await reader.read()  # until the client closes or pools the connection
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


REQUEST = BuiltRequest("/v1/chat/completions", b'{"model":"m"}', stream=True, output_tokens=3)


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


async def measure(
    clock: FakeClock,
    script: list[Step],
    request: BuiltRequest = REQUEST,
    **settings: float | str,
) -> tuple[RequestRecord, Server]:
    async with Server(clock, script) as server:
        client = BenchClient(ClientSettings(server.url, **settings), clock, t0=0.0)  # type: ignore[arg-type]
        record = RequestRecord(0, 0.0, math.nan, math.nan, request.stream)
        try:
            await client.send(request, record)
        finally:
            await client.close()
    return record, server


# --- what a good stream measures ---------------------------------------------------------------


async def test_first_token_skips_the_role_chunk_and_usage_gives_the_counts(
    clock: FakeClock,
) -> None:
    script: list[Step] = [
        Raw(SSE_HEAD), At(1.0), Send(chat("", role=True)),
        At(1.25), Send(chat("Hello")), At(1.5), Send(chat(" big")),
        At(2.0), Send(chat(" world") + usage(12, 3) + DONE), END,
    ]  # fmt: skip
    record, _ = await measure(clock, script)
    assert record.error_kind is None, record.error
    assert record.status == 200
    assert record.replica == "replica-7"
    assert record.sent_s == 0.0
    assert record.first_token_s == 1.25
    assert record.token_times_s == [1.25, 1.5, 2.0]
    assert record.end_s == 2.0
    assert (record.prompt_tokens, record.output_tokens, record.tokens_from_usage) == (12, 3, True)


async def test_without_usage_tokens_are_counted_text_chunks_and_flagged(clock: FakeClock) -> None:
    script: list[Step] = [
        Raw(SSE_HEAD), At(0.5), Send(chat("a") + chat("b")), At(0.75), Send(chat("c") + DONE), END,
    ]  # fmt: skip
    record, _ = await measure(clock, script)
    assert record.ok
    assert record.token_times_s == [0.5, 0.5, 0.75]  # two events in one read share its time
    assert (record.output_tokens, record.tokens_from_usage, record.prompt_tokens) == (
        3,
        False,
        None,
    )


@pytest.mark.parametrize(
    ("first", "expected_first_s"),
    [
        pytest.param(chat(reasoning_content="think"), 1.0, id="reasoning_content"),
        pytest.param(chat(reasoning="think"), 1.0, id="reasoning"),
        pytest.param(chat(""), 2.0, id="empty-content-is-no-token"),
        pytest.param(data({"choices": [{"index": 0, "text": "Once"}]}), 1.0, id="completions-text"),
        pytest.param(data({"choices": [{"index": 0, "text": ""}]}), 2.0, id="completions-empty"),
    ],
)
async def test_what_counts_as_generated_text(
    clock: FakeClock, first: bytes, expected_first_s: float
) -> None:
    script: list[Step] = [
        Raw(SSE_HEAD), At(1.0), Send(first), At(2.0), Send(chat("x") + DONE), END,
    ]  # fmt: skip
    record, _ = await measure(clock, script)
    assert record.ok
    assert record.first_token_s == expected_first_s


async def test_an_event_split_across_reads_counts_when_it_completes_crlf_too(
    clock: FakeClock,
) -> None:
    event = chat("Hi").replace(b"\n", b"\r\n")
    script: list[Step] = [
        Raw(SSE_HEAD), At(1.0), Send(event[:10]), At(1.5), Send(event[10:-1]),
        At(1.75), Send(event[-1:] + b": keep-alive\r\n\r\n" + DONE), END,
    ]  # fmt: skip
    record, _ = await measure(clock, script)
    assert record.ok, record.error
    assert record.token_times_s == [1.75]


async def test_api_key_goes_as_a_bearer_token(clock: FakeClock) -> None:
    script: list[Step] = [Raw(SSE_HEAD), Send(chat("a") + DONE), END]
    _, server = await measure(clock, script, api_key="sk-test")
    assert b"\r\nAuthorization: Bearer sk-test\r\n" in server.heads[0]


async def test_non_stream_has_no_first_token_and_reads_usage(clock: FakeClock) -> None:
    body = orjson.dumps(
        {"choices": [{"message": {"content": "hi there"}}], "usage": {"prompt_tokens": 4,
         "completion_tokens": 2}}
    )  # fmt: skip
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    request = BuiltRequest("/v1/completions", b"{}", stream=False, output_tokens=2)
    record, _ = await measure(clock, [At(3.0), Raw(head.encode() + b"\r\n\r\n" + body)], request)
    assert record.ok
    assert (record.first_token_s, record.token_times_s, record.end_s) == (None, [], 3.0)
    assert (record.prompt_tokens, record.output_tokens, record.tokens_from_usage) == (4, 2, True)


NON_STREAM = BuiltRequest("/v1/completions", b"{}", stream=False, output_tokens=2)
NON_STREAM_BODY = orjson.dumps(
    {"choices": [{"text": "long answer"}], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
)
NON_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % len(NON_STREAM_BODY)
)


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([Stall(0.6), Raw(NON_STREAM_HEAD + NON_STREAM_BODY)], id="slow-head"),
        pytest.param([Raw(NON_STREAM_HEAD), Stall(0.6), Raw(NON_STREAM_BODY)], id="slow-body"),
    ],
)
async def test_non_stream_is_bounded_by_the_total_timeout_not_the_idle_one(
    clock: FakeClock, script: list[Step]
) -> None:
    """A non-stream answer that takes longer than the idle timeout (0.2 s) but less than the
    total (5 s) is a success: nothing streams, so there are no gaps for an idle bound."""
    record, _ = await measure(clock, script, NON_STREAM, idle_timeout_s=0.2, total_timeout_s=5.0)
    assert record.error_kind is None, record.error
    assert (record.output_tokens, record.prompt_tokens) == (2, 4)


async def test_non_stream_past_the_total_timeout_is_a_timeout(clock: FakeClock) -> None:
    script: list[Step] = [Raw(NON_STREAM_HEAD), Stall(5.0), Raw(NON_STREAM_BODY)]
    record, _ = await measure(clock, script, NON_STREAM, idle_timeout_s=5.0, total_timeout_s=0.3)
    assert record.error_kind == "timeout"
    assert record.error == "no complete response within 0.3 s"


# --- every error kind ---------------------------------------------------------------------------

ENVELOPE = b'{"error":{"message":"slow down","type":"rate_limit_error","code":null}}'


@pytest.mark.parametrize(
    ("script", "kind", "message"),
    [
        pytest.param([http_error("429 Too Many Requests", ENVELOPE)], "http_4xx",
                     "HTTP 429: slow down", id="429-envelope"),
        pytest.param([http_error("503 Service Unavailable", b"no replica")], "http_5xx",
                     "HTTP 503: no replica", id="503-text"),
        pytest.param([Raw(SSE_HEAD), Send(chat("a")), Send(data({"error": {"message": "boom"}})),
                      Send(DONE), END], "stream_error", "boom", id="error-event"),
        pytest.param([Raw(SSE_HEAD), Send(chat("a")), END], "stream_error", "without data: [DONE]",
                     id="no-done"),
        pytest.param([Raw(SSE_HEAD), Send(chat("a")), Cut()], "disconnect", "mid-response",
                     id="cut-mid-stream"),
        pytest.param([Raw(SSE_HEAD), Send(b"data: {not json\n\n"), END], "protocol", "not JSON",
                     id="bad-json"),
        pytest.param([Raw(SSE_HEAD.replace(b"text/event-stream", b"application/json")), END],
                     "protocol", "expected an SSE stream", id="not-sse"),
        pytest.param([Raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")], "protocol", "malformed",
                     id="bad-chunking"),
        pytest.param([Raw(SSE_HEAD), Send(chat("a")), Stall(5.0)], "timeout", "idle timeout",
                     id="idle-timeout"),
        pytest.param([Stall(5.0)], "timeout", "no response head", id="no-head"),
    ],
)  # fmt: skip
async def test_error_kinds(clock: FakeClock, script: list[Step], kind: str, message: str) -> None:
    record, _ = await measure(clock, script, idle_timeout_s=0.3, total_timeout_s=5.0)
    assert record.error_kind == kind
    assert record.error is not None
    assert message in record.error
    assert not math.isnan(record.end_s)


async def test_total_timeout_while_chunks_keep_coming(clock: FakeClock) -> None:
    trickle: list[Step] = [Raw(SSE_HEAD), *(Send(chat("a")) for _ in range(100))]
    record, _ = await measure(clock, trickle, idle_timeout_s=1.0, total_timeout_s=0.3)
    assert record.error_kind == "timeout"
    assert record.error == "no complete response within 0.3 s"
    assert record.token_times_s
    assert record.first_token_s == record.token_times_s[0]


async def test_connect_refused(clock: FakeClock) -> None:
    client = BenchClient(ClientSettings(f"http://127.0.0.1:{free_port()}"), clock, t0=0.0)
    record = RequestRecord(0, 0.0, math.nan, math.nan, True)
    await client.send(REQUEST, record)
    await client.close()
    assert record.error_kind == "connect"
    assert record.status is None


async def test_cancelled_mid_stream_is_recorded_and_raised(clock: FakeClock) -> None:
    script: list[Step] = [Raw(SSE_HEAD), At(1.0), Send(chat("a")), Stall(5.0)]
    async with Server(clock, script) as server:
        client = BenchClient(ClientSettings(server.url), clock, t0=0.0)
        record = RequestRecord(0, 0.0, math.nan, math.nan, True)
        task = asyncio.ensure_future(client.send(REQUEST, record))
        for _ in range(200):
            await asyncio.sleep(0.005)
            if clock.now() >= 1.0:
                break
        await asyncio.sleep(DELIVERY_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.close()
    assert record.error_kind == "cancelled"
    assert record.token_times_s == [1.0]
    assert record.first_token_s == 1.0
    assert record.end_s == 1.0
