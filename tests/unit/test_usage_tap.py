"""Reading the engine's usage out of a stream, and stripping the usage chunk the gateway
asked for (tenancy), without delaying content the client could read."""

from __future__ import annotations

import orjson
import pytest

from fleetserve.protocol.inspect import inspect_request, rewrite_body
from fleetserve.protocol.sse import DONE, SseDecoder, UsageTap, encode_event, usage_of


def _content(text: str) -> bytes:
    return encode_event({"choices": [{"index": 0, "delta": {"content": text}}]})


USAGE = encode_event(
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
)
STREAM = _content("a") + _content("b") + _content("c") + USAGE + DONE


def _through(tap: UsageTap, reads: list[bytes]) -> bytes:
    out = b"".join(tap.feed(r) for r in reads)
    return out + tap.finish()


@pytest.mark.parametrize("size", [1, 2, 5, 13, 64, len(STREAM)])
def test_usage_is_read_and_stripped_whatever_the_read_sizes(size: int) -> None:
    tap = UsageTap(strip=True)
    reads = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    out = _through(tap, reads)
    assert tap.usage == (7, 3)
    assert out == _content("a") + _content("b") + _content("c") + DONE
    events = SseDecoder().feed(out)
    assert all(b"usage" not in e for e in events)


def test_usage_the_client_asked_for_passes_on() -> None:
    tap = UsageTap(strip=False)
    assert _through(tap, [STREAM]) == STREAM
    assert tap.usage == (7, 3)


def _nulled(text: str, spaced: bool = False) -> bytes:
    event = {"choices": [{"index": 0, "delta": {"content": text}}], "usage": None}
    if spaced:  # as json.dumps writes it
        return b"data: " + orjson.dumps(event).replace(b'"usage":null', b'"usage": null') + b"\n\n"
    return encode_event(event)


NULLED = _nulled("a") + _nulled("b", spaced=True) + _nulled('"usage":{"x"}') + USAGE + DONE


@pytest.mark.parametrize("size", [1, 7, 64, len(NULLED)])
def test_usage_null_on_every_event_as_openai_streams_it(size: int) -> None:
    tap = UsageTap(strip=True)
    reads = [NULLED[i : i + size] for i in range(0, len(NULLED), size)]
    assert _through(tap, reads) == NULLED.replace(USAGE, b"")
    assert tap.usage == (7, 3)
    kept = UsageTap(strip=False)
    assert _through(kept, [NULLED]) == NULLED
    assert kept.usage == (7, 3)


def test_events_with_usage_null_pass_untouched() -> None:
    tap = UsageTap(strip=True)
    read = _nulled("a") + _nulled("b")
    assert tap.feed(read) is read  # not parsed: the same bytes object
    assert tap.usage is None


def test_whole_events_without_usage_pass_untouched_and_at_once() -> None:
    tap = UsageTap(strip=True)
    first = _content("hello")
    assert tap.feed(first) is first  # the fast path: the same bytes object
    half = _content("x")[:9]
    assert tap.feed(half) == b""  # half an event waits for its end...
    assert tap.feed(_content("x")[9:]) == _content("x")  # ...and goes with it


def test_a_stream_without_usage_reports_none() -> None:
    tap = UsageTap(strip=True)
    _through(tap, [_content("a") + DONE])
    assert tap.usage is None


def test_usage_of_a_whole_answer() -> None:
    body = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}})
    assert usage_of(body) == (5, 9)
    assert usage_of(b'{"choices": []}') is None
    assert usage_of(b"not json") is None


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}},
                     id="usage-last"),
        pytest.param({"usage": {"prompt_tokens": 5, "completion_tokens": 9}, "choices": [],
                      "kv_transfer_params": None}, id="usage-first"),
        pytest.param({"usage": {"prompt_tokens": 5, "completion_tokens": 9},
                      "choices": [{"message": {"content": '"usage": {"prompt_tokens": 1}'}}]},
                     id="usage-in-the-text-after"),
        pytest.param({"usage": {"prompt_tokens": 5, "completion_tokens": 9},
                      "extra": {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}},
                     id="a-nested-usage-after"),
        pytest.param({"usage": {"prompt_tokens": 5, "completion_tokens": 9,
                                "prompt_tokens_details": {"cached_tokens": 2}},
                      "object": "usage"}, id="usage-as-a-value-after"),
    ],
)  # fmt: skip
def test_usage_of_finds_the_answers_own_usage_wherever_it_is(answer: dict[str, object]) -> None:
    assert usage_of(orjson.dumps(answer)) == (5, 9)
    assert usage_of(orjson.dumps(answer, option=orjson.OPT_INDENT_2)) == (5, 9)


def test_rewrite_adds_usage_by_splicing_and_keeps_the_rest() -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
    info = inspect_request(raw, chat=True)
    out = rewrite_body(raw, info, include_usage=True, max_tokens=None)
    assert orjson.loads(out) == {**orjson.loads(raw), "stream_options": {"include_usage": True}}
    assert inspect_request(out, chat=True).include_usage


def test_rewrite_merges_existing_stream_options_and_caps_max_tokens() -> None:
    raw = orjson.dumps(
        {"model": "m", "prompt": "x", "stream": True, "stream_options": {"other": 1},
         "max_completion_tokens": 900}
    )  # fmt: skip
    info = inspect_request(raw, chat=False)
    out = orjson.loads(rewrite_body(raw, info, include_usage=True, max_tokens=12))
    assert out["stream_options"] == {"other": 1, "include_usage": True}
    assert out["max_tokens"] == 12
    assert "max_completion_tokens" not in out


def test_no_rewrite_returns_the_same_bytes() -> None:
    raw = b'{"model":"m","prompt":"x"}'
    info = inspect_request(raw, chat=False)
    assert rewrite_body(raw, info, include_usage=False, max_tokens=None) is raw
