"""Server-sent events as OpenAI streams them: `data: <json>\\n\\n`, ending in `data: [DONE]`."""

from __future__ import annotations

import re

import orjson

from fleetserve.errors import ApiError
from fleetserve.protocol.envelope import api_error_body

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def encode_event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def encode_error_event(err: ApiError) -> bytes:
    """The event that ends a stream that failed mid-way (OpenAI's error shape in a data line)."""
    return b"data: " + api_error_body(err) + b"\n\n"


class SseDecoder:
    """Incremental decoder: feed raw bytes as they arrive, get each whole event's data field.

    Follows the WHATWG event-stream rules that OpenAI streams use: events split across reads,
    CRLF or LF line ends, multi-line data fields (joined with LF), other fields and comment
    lines (ignored). The common case, one `data: ` line per event with LF line ends, costs
    one split per read: bench decodes thousands of streams at once with it.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._buf + chunk if self._buf else chunk
        carry = b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
            if data.endswith(b"\r"):  # its \n may come in the next read
                data, carry = data[:-1], b"\r"
        events = data.split(b"\n\n")
        self._buf = events.pop() + carry
        out = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                out.append(event[6:])
                continue
            lines = [
                line.partition(b":")[2].removeprefix(b" ")
                for line in event.split(b"\n")
                if line.startswith(b"data") and line[4:5] in (b":", b"")
            ]
            if lines:
                out.append(b"\n".join(lines))
        return out

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished event are buffered."""
        return bool(self._buf.strip())


def chunk_has_content(chunk: dict[str, object]) -> bool:
    """Whether a decoded stream chunk carries generated output in one of its choices: a
    delta's `content`, `reasoning_content` (vLLM, DeepSeek), `reasoning` (newer vLLM) or
    `tool_calls` (chat), or a choice's `text` (completions). The role-only first chunk, the
    usage chunk and an error event do not."""
    choices = chunk.get("choices")
    if type(choices) is not list:
        return False
    for choice in choices:
        if type(choice) is not dict:
            continue
        delta = choice.get("delta")
        if type(delta) is dict:
            if (
                delta.get("content")
                or delta.get("reasoning_content")
                or delta.get("reasoning")
                or delta.get("tool_calls")
            ):
                return True
        elif choice.get("text"):
            return True
    return False


def event_has_content(data: bytes) -> bool:
    """`chunk_has_content` of an event's data field as `SseDecoder` yields it; False for
    `[DONE]` and for data that is not a JSON object."""
    if data == b"[DONE]":
        return False
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return type(chunk) is dict and chunk_has_content(chunk)


# A field of a stream chunk that carries generated output, as `chunk_has_content` reads them:
# a non-empty string `content` / `reasoning_content` / `reasoning` / `text`, or `tool_calls`
# with an entry. Escaped quotes inside strings (\") cannot form a match.
_CONTENT_FIELD = re.compile(
    rb'"(?:content|reasoning_content|reasoning|text)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[\s*\{'
)


def count_content_events(chunk: bytes) -> int:
    """How many events in `chunk` (stream bytes as read) carry generated output: what
    `event_has_content` decides for each, by a byte scan instead of a JSON parse. An event
    split across two reads counts in the read that holds its output field, or, in the rare
    case that the field itself is split, not at all. The gateway counts with `OutputCounter`,
    which is faster on a long stream."""
    if chunk.count(b"\n\n") <= 1:  # the usual read: one event, or part of one
        return 1 if _CONTENT_FIELD.search(chunk) else 0
    return sum(map(bool, map(_CONTENT_FIELD.search, chunk.split(b"\n\n"))))


# The output fields as compact JSON writes them (vLLM, llama.cpp, OpenAI), each with its
# empty value: a stream keeps to one of them for most of its events.
_COMPACT_KEYS = tuple(
    (key, key + b'"')
    for key in (b'"content":"', b'"text":"', b'"reasoning_content":"', b'"reasoning":"')
)


class OutputCounter:
    """`count_content_events` for one stream, read after read, at a fraction of its cost.

    Compact JSON (vLLM, llama.cpp, OpenAI) is counted with substring counts of the output
    fields, non-empty ones, starting with the field the stream's last output came in; only a
    read with none of them (the finish or usage chunk, `[DONE]`, tool calls, JSON with spaces)
    goes through the pattern. It counts choices with output, which are events as engines
    send them (one choice an event).
    """

    __slots__ = ("_field",)

    def __init__(self) -> None:
        self._field = _COMPACT_KEYS[0]

    def count(self, chunk: bytes) -> int:
        key, empty = field = self._field
        found = chunk.count(key)
        if found and (found := found - chunk.count(empty)):
            return found
        for other in _COMPACT_KEYS:
            if other is field:
                continue
            found = chunk.count(other[0])
            if found and (found := found - chunk.count(other[1])):
                self._field = other
                return found
        return count_content_events(chunk)


def _has_usage(data: bytes) -> bool:
    """Whether `data` may hold a usage other than `"usage":null`. With include_usage, OpenAI
    and the engines put `"usage":null` in every event before the last: those are not parsed
    (parsing each event of every read cost 25-44 us a stream, benchmarks/README.md). A
    spaced `"usage": null` counts as maybe (the events are then parsed, as before)."""
    found = data.count(b'"usage"')
    return found > 0 and found != data.count(b'"usage":null')


class UsageTap:
    """Reads the engine's `usage` out of a stream as it passes, and drops the usage-only
    event when the gateway asked for it and the client did not (`strip`).

    Whole events pass on at once; the bytes of an unfinished last event wait for the rest of
    it (a client cannot use half an event, so this delays nothing it could read). A read with
    no `"usage"` in it and no unfinished event before it passes on as it is, untouched.
    """

    __slots__ = ("_carry", "completion_tokens", "prompt_tokens", "strip")

    def __init__(self, *, strip: bool) -> None:
        self.strip = strip
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self._carry = b""

    @property
    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens, once the usage event has passed."""
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens, self.completion_tokens

    def feed(self, chunk: bytes) -> bytes:
        """What of `chunk` to send on now."""
        if not self._carry and chunk.endswith(b"\n\n") and not _has_usage(chunk):
            return chunk
        data = self._carry + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._carry = data
            return b""
        whole, self._carry = data[: end + 2], data[end + 2 :]
        if not _has_usage(whole):
            return whole
        return self._tapped(whole)

    def _tapped(self, whole: bytes) -> bytes:
        """`whole` (events that end in a blank line) less the usage-only event when stripped:
        only the events with a usage other than null are looked at."""
        kept: list[bytes] = []
        at = 0  # the start of what is not yet looked at (an event's start)
        pos = whole.find(b'"usage"')
        while pos >= 0:
            if whole.startswith(b'"usage":null', pos):
                pos = whole.find(b'"usage"', pos + 7)
                continue
            start = whole.rfind(b"\n\n", at, pos)
            start = at if start < 0 else start + 2
            end = whole.find(b"\n\n", pos) + 2
            if not self._keep(whole[start : end - 2]):
                kept.append(whole[at:start])
                at = end
            pos = whole.find(b'"usage"', end)
        if not kept:
            return whole
        kept.append(whole[at:])
        return b"".join(kept)

    def finish(self) -> bytes:
        """The end of the stream: whatever was still waiting, as it is."""
        rest, self._carry = self._carry, b""
        return rest

    def _keep(self, event: bytes) -> bool:
        if not event.startswith(b"data:") or not _has_usage(event):
            return True
        try:
            chunk = orjson.loads(event[5:])
        except orjson.JSONDecodeError:
            return True
        usage = chunk.get("usage") if type(chunk) is dict else None
        if type(usage) is not dict:
            return True
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and type(completion) is int:
            self.prompt_tokens, self.completion_tokens = prompt, completion
        return not (self.strip and not chunk.get("choices"))


def usage_of(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a whole (non-stream) answer's `usage`, if it has one.

    Engines put `usage` after `choices`, so the answer from its key on, reopened with `{`, is
    most often a JSON object of its own, and parsing it skips the completion's text. Only
    the answer's own key can parse so: inside a string the quotes would be escaped, and from
    a key of a nested object on the braces do not balance. Otherwise: the whole answer."""
    key = body.rfind(b'"usage"')
    if key < 0:
        return None
    try:
        answer = orjson.loads(b"{" + body[key:])
    except orjson.JSONDecodeError:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    usage = answer.get("usage") if type(answer) is dict else None
    if type(usage) is not dict:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is int and type(completion) is int:
        return prompt, completion
    return None
