"""The Locust example's building blocks, importable without Locust (its unit test does).

Requests come from `fleetserve bench`'s own builder (`fleetserve.bench.workload.Workload`),
so a Locust run and a bench run with the same options send the same bodies. A stream is read
with fleetserve's SSE decoder; its timing follows bench's definitions (vLLM's benchmark docs):
TTFT is the first chunk that carries generated text, TPOT is (e2e - TTFT) / (tokens - 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from fleetserve.bench.lengths import parse_length
from fleetserve.bench.workload import Api, Workload, WorkloadSpec
from fleetserve.errors import ConfigError
from fleetserve.protocol.sse import SseDecoder

# Option name -> (environment variable, default, help). Locust shows them in its web UI too.
OPTIONS: dict[str, tuple[str, str, str]] = {
    "model": ("FLEETSERVE_MODEL", "", "model name sent in every request (required)"),
    "api": ("FLEETSERVE_API", "chat", "chat or completions"),
    "prompt_tokens": ("FLEETSERVE_PROMPT_TOKENS", "128", "N, uniform:lo=N,hi=N, normal:..."),
    "output_tokens": ("FLEETSERVE_OUTPUT_TOKENS", "128", "max_tokens: N or a distribution"),
    "prefix_groups": ("FLEETSERVE_PREFIX_GROUPS", "0", "groups sharing a system prompt"),
    "prefix_tokens": ("FLEETSERVE_PREFIX_TOKENS", "0", "length of each shared system prompt"),
    "stream": ("FLEETSERVE_STREAM", "true", "true: streaming (TTFT measured); false: not"),
    "seed": ("FLEETSERVE_SEED", "0", "seed of the prompts (same seed, same bodies)"),
    "api_key": ("FLEETSERVE_API_KEY", "", "sent as 'Authorization: Bearer KEY' when set"),
}


def _whole(name: str, value: object) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not a whole number") from None


def _flag(name: str, value: object) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not true or false")


def workload_spec(options: Mapping[str, object]) -> WorkloadSpec:
    """A bench workload from option values (strings from the command line, env or web UI)."""
    get = {name: options.get(name, default) for name, (_, default, _) in OPTIONS.items()}
    model = str(get["model"] or "").strip()
    if not model:
        raise ConfigError("--model (or FLEETSERVE_MODEL) is required")
    api = str(get["api"]).strip()
    if api not in ("chat", "completions"):
        raise ConfigError(f"--api must be chat or completions, got {api!r}")
    api_name: Api = "chat" if api == "chat" else "completions"
    return WorkloadSpec(
        model=model,
        api=api_name,
        stream=_flag("stream", get["stream"]),
        prompt_tokens=parse_length(str(get["prompt_tokens"])),
        output_tokens=parse_length(str(get["output_tokens"])),
        prefix_groups=_whole("prefix_groups", get["prefix_groups"]),
        prefix_tokens=_whole("prefix_tokens", get["prefix_tokens"]),
    )


def build_workload(options: Mapping[str, object]) -> Workload:
    """The request builder the users share: same options and seed, same bodies."""
    return Workload(workload_spec(options), seed=_whole("seed", options.get("seed", "0")))


def options_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Option values from FLEETSERVE_* variables, defaults where unset."""
    return {name: environ.get(var, default) for name, (var, default, _) in OPTIONS.items()}


def request_headers(api_key: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


@dataclass(frozen=True, slots=True)
class StreamTiming:
    """One finished response as Locust reports it (seconds from the send)."""

    e2e_s: float
    ttft_s: float | None  # first chunk with generated text; None if none came
    content_chunks: int
    output_tokens: int | None  # from the server's usage, when it sent one
    received_bytes: int
    error: str | None  # None: a whole, valid answer

    @property
    def tpot_s(self) -> float | None:
        tokens = self.output_tokens or self.content_chunks
        if self.ttft_s is None or tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (tokens - 1)


class StreamReader:
    """Feed a streamed body as it arrives, with the time of each read; then `finish()`."""

    def __init__(self) -> None:
        self._decoder = SseDecoder()
        self._ttft_s: float | None = None
        self._chunks = 0
        self._tokens: int | None = None
        self._bytes = 0
        self._done = False
        self._error: str | None = None

    def feed(self, data: bytes, at_s: float) -> None:
        self._bytes += len(data)
        for payload in self._decoder.feed(data):
            self._event(payload, at_s)

    def _event(self, payload: bytes, at_s: float) -> None:
        if payload.strip() == b"[DONE]":
            self._done = True
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._error = self._error or f"an SSE event is not JSON: {payload[:80]!r}"
            return
        if not isinstance(event, dict):
            self._error = self._error or f"an SSE event is not an object: {payload[:80]!r}"
            return
        if event.get("error") is not None:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            self._error = self._error or f"stream error: {message}"
            return
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self._tokens = usage["completion_tokens"]
        for choice in event.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            text = delta.get("content") if isinstance(delta, dict) else None
            if text or (isinstance(choice, dict) and choice.get("text")):
                self._chunks += 1
                if self._ttft_s is None:
                    self._ttft_s = at_s

    def finish(self, at_s: float) -> StreamTiming:
        error = self._error
        if error is None and not self._done:
            error = "the stream ended without data: [DONE]"
        return StreamTiming(at_s, self._ttft_s, self._chunks, self._tokens, self._bytes, error)


def whole_body_timing(body: bytes, at_s: float) -> StreamTiming:
    """A non-streamed answer: its usage, or why it is not a valid completion."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return StreamTiming(at_s, None, 0, None, len(body), "the answer is not JSON")
    if not isinstance(answer, dict) or not answer.get("choices"):
        return StreamTiming(at_s, None, 0, None, len(body), f"no choices in {body[:80]!r}")
    usage = answer.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    count = tokens if isinstance(tokens, int) else None
    return StreamTiming(at_s, None, 0, count, len(body), None)
