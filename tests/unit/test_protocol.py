"""SSE codec, request inspection and the error envelope."""

from __future__ import annotations

import json
import random

import orjson
import pytest

from fleetserve.errors import (
    ApiError,
    GatewayTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    NoReplicaError,
    PayloadTooLargeError,
    UpstreamStatusError,
)
from fleetserve.protocol.envelope import api_error_body
from fleetserve.protocol.inspect import PREFIX_KEY_CHARS, inspect_request
from fleetserve.protocol.sse import (
    DONE,
    OutputCounter,
    SseDecoder,
    count_content_events,
    encode_error_event,
    encode_event,
    event_has_content,
)


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        pytest.param([b"data: a\n\n"], [b"a"], id="one-event"),
        pytest.param([b"data: a\n\ndata: b\n\n"], [b"a", b"b"], id="two-in-one-read"),
        pytest.param([b"da", b"ta: a", b"\n", b"\n"], [b"a"], id="split-everywhere"),
        pytest.param([b"data: a\r\n\r\n"], [b"a"], id="crlf"),
        pytest.param([b": keep-alive\n\ndata: a\n\n"], [b"a"], id="comment-ignored"),
        pytest.param([b"data: a\ndata: b\n\n"], [b"a\nb"], id="multi-line-data"),
        pytest.param([b"event: x\nid: 1\ndata:a\n\n"], [b"a"], id="other-fields-no-space"),
        pytest.param([b"data: a\n"], [], id="unterminated"),
        pytest.param([b"data: a\r", b"\n\r\n"], [b"a"], id="crlf-split-between-reads"),
        pytest.param([b"data\n\n"], [b""], id="data-without-colon-is-empty"),
        pytest.param([b"data: a\n\n\n\ndata: b\n\n"], [b"a", b"b"], id="extra-blank-lines"),
        pytest.param([b": only a comment\n\n"], [], id="comment-only-event"),
        pytest.param([b"datum: x\ndata: a\n\n"], [b"a"], id="field-named-like-data"),
    ],
)
def test_sse_decoder(pieces: list[bytes], expected: list[bytes]) -> None:
    decoder = SseDecoder()
    events = [e for piece in pieces for e in decoder.feed(piece)]
    assert events == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b'{"choices":[{"delta":{"content":"hi"}}]}', True, id="content"),
        pytest.param(b'{"choices":[{"delta":{"role":"assistant","content":""}}]}', False,
                     id="role-only-first-chunk"),
        pytest.param(b'{"choices":[{"delta":{"reasoning_content":"hm"}}]}', True,
                     id="reasoning-content"),
        pytest.param(b'{"choices":[{"delta":{"reasoning":"hm"}}]}', True, id="reasoning"),
        pytest.param(b'{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}', True,
                     id="tool-calls"),
        pytest.param(b'{"choices":[{"text":"hi"}]}', True, id="completions-text"),
        pytest.param(b'{"choices":[],"usage":{"completion_tokens":3}}', False, id="usage-chunk"),
        pytest.param(b'{"error":{"message":"gone"}}', False, id="error-event"),
        pytest.param(b"[DONE]", False, id="done"),
        pytest.param(b"not json", False, id="not-json"),
        pytest.param(b"[1, 2]", False, id="not-an-object"),
        pytest.param(b'{"choices": 5}', False, id="choices-not-a-list"),
        pytest.param(b'{"choices": [7, {"delta": {"content": "x"}}]}', True,
                     id="odd-choice-skipped"),
    ],
)  # fmt: skip
def test_event_has_content(data: bytes, expected: bool) -> None:
    assert event_has_content(data) is expected


def test_sse_round_trip_and_error_event() -> None:
    decoder = SseDecoder()
    payload = {"choices": [{"delta": {"content": "hé\n"}}]}
    assert [orjson.loads(e) for e in decoder.feed(encode_event(payload))] == [payload]
    assert decoder.feed(DONE) == [b"[DONE]"]
    event = decoder.feed(encode_error_event(NoReplicaError("gone")))[0]
    assert orjson.loads(event) == {
        "error": {"message": "gone", "type": "server_error", "param": None,
                  "code": "no_replica_available"}
    }  # fmt: skip
    assert not decoder.pending


@pytest.mark.parametrize(
    ("err", "status", "error_type", "code"),
    [
        pytest.param(InvalidRequestError("x", param="model"), 400, "invalid_request_error", None,
                     id="400"),
        pytest.param(ModelNotFoundError("x"), 404, "invalid_request_error", "model_not_found",
                     id="404"),
        pytest.param(PayloadTooLargeError("x"), 413, "invalid_request_error",
                     "payload_too_large", id="413"),
        pytest.param(NoReplicaError("x"), 503, "server_error", "no_replica_available", id="503"),
        pytest.param(GatewayTimeoutError("x", code="upstream_idle_timeout"), 504,
                     "timeout_error", "upstream_idle_timeout", id="504-code-override"),
    ],
)  # fmt: skip
def test_error_mapping(err: ApiError, status: int, error_type: str, code: str | None) -> None:
    assert err.status == status
    body = orjson.loads(api_error_body(err))["error"]
    assert body["type"] == error_type
    assert body["code"] == code
    assert body["message"] == "x"


def test_upstream_status_error_retryable_only_for_5xx() -> None:
    assert UpstreamStatusError(502, b"", None).retryable
    assert not UpstreamStatusError(429, b"", None).retryable


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "chat", "message"),
    [
        pytest.param(b"{", True, "not valid JSON", id="bad-json"),
        pytest.param(b"[]", True, "JSON object", id="not-object"),
        pytest.param(b'{"messages": []}', True, "'model'", id="no-model"),
        pytest.param(b'{"model": 3, "messages": [1]}', True, "'model'", id="model-not-str"),
        pytest.param(b'{"model": "m", "messages": []}', True, "'messages'", id="empty-messages"),
        pytest.param(b'{"model": "m"}', False, "'prompt'", id="no-prompt"),
        pytest.param(orjson.dumps({**CHAT, "stream": "yes"}), True, "'stream'", id="stream-str"),
        pytest.param(orjson.dumps({**CHAT, "max_tokens": 0}), True, "max_tokens", id="zero-max"),
        pytest.param(orjson.dumps({**CHAT, "max_tokens": True}), True, "max_tokens", id="bool"),
    ],
)
def test_inspect_rejects(body: bytes, chat: bool, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        inspect_request(body, chat=chat)


def test_inspect_reads_routing_fields() -> None:
    body = {
        **CHAT,
        "messages": [{"role": "system", "content": "S" * 400}, {"role": "user", "content": "q"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 7,
    }
    info = inspect_request(orjson.dumps(body), chat=True)
    assert (info.model, info.stream, info.include_usage, info.max_tokens) == ("m", True, True, 7)
    assert info.prefix_key.startswith("system:SSS")
    assert len(info.prefix_key) == PREFIX_KEY_CHARS


def test_prefix_key_is_shared_by_requests_with_one_system_prompt() -> None:
    system = {"role": "system", "content": "You are a support bot. " * 20}
    a = inspect_request(
        orjson.dumps({**CHAT, "messages": [system, {"role": "user", "content": "a"}]}), chat=True
    )
    b = inspect_request(
        orjson.dumps({**CHAT, "messages": [system, {"role": "user", "content": "b"}]}), chat=True
    )
    c = inspect_request(orjson.dumps({"model": "m", "prompt": ["text"]}), chat=False)
    assert a.prefix_key == b.prefix_key
    assert c.prefix_key == "text"


def _chunks(rng: random.Random) -> list[dict[str, object]]:
    """Stream chunks in the shapes vLLM, llama.cpp and OpenAI send, with awkward text."""
    texts = ["", "hi", '"', 'say "x"', "\\", "a\nb", "content", '"content":"x"', "é", " "]
    out: list[dict[str, object]] = []
    for _ in range(400):
        text = rng.choice(texts) + rng.choice(texts)
        kind = rng.randrange(9)
        if kind == 0:
            delta: dict[str, object] = {"role": "assistant", "content": text}
        elif kind == 1:
            delta = {"content": text}
        elif kind == 2:
            delta = {"reasoning_content": text, "content": None}
        elif kind == 3:
            delta = {
                "tool_calls": rng.choice([[], [{"index": 0, "function": {"arguments": text}}]])
            }
        elif kind == 4:
            out.append({"choices": [{"index": 0, "text": text, "logprobs": None}]})
            continue
        elif kind == 5:
            out.append({"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 1}})
            continue
        elif kind == 6:
            out.append({"error": {"message": f'failed: "content":"{text}"', "code": None}})
            continue
        elif kind == 7:
            delta = {}
        else:
            delta = {"content": text, "role": None}
        choice = {"index": 0, "delta": delta, "finish_reason": rng.choice([None, "stop"])}
        out.append({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})
    return out


@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced-json"])
def test_count_content_events_agrees_with_event_has_content(spaced: bool) -> None:
    """The gateway's byte scan decides what the JSON parse decides, event by event and for
    several events in one read."""
    rng = random.Random(7)
    chunks = _chunks(rng)
    encoded = [
        json.dumps(c).encode() if spaced else orjson.dumps(c) for c in chunks
    ]  # json.dumps puts a space after every ':' and ','
    counter = OutputCounter()  # one stream, read after read, as the gateway counts
    for data in encoded:
        expected = int(event_has_content(data))
        assert count_content_events(b"data: " + data + b"\n\n") == expected
        assert counter.count(b"data: " + data + b"\n\n") == expected, data
    for start in range(0, len(encoded), 5):  # coalesced reads
        group = encoded[start : start + 5]
        read = b"".join(b"data: " + d + b"\n\n" for d in group)
        expected = sum(event_has_content(d) for d in group)
        assert count_content_events(read) == expected
        if spaced or len({_kind(d) for d in group if event_has_content(d)}) <= 1:
            assert counter.count(read) == expected, read  # one kind of output per read
    assert count_content_events(b"data: [DONE]\n\n") == 0
    assert counter.count(b"data: [DONE]\n\n") == 0


def _kind(data: bytes) -> bytes:
    """Which compact output field an event's output is in (reads mixing two are rare)."""
    for key in (b'"content":"', b'"text":"', b'"reasoning_content":"', b'"tool_calls":'):
        if key in data and key + b'"' not in data:
            return key
    return b""
