"""OpenAI requests in, response bodies and stream events out, for the SIMULATED engine.

Pure functions: parse and check a request body, plan its output (`text.plan_output`), and
render what goes back, byte for byte as OpenAI shapes it. The HTTP app in `server.py` only
moves these bytes.

What the simulator refuses with a 400, although the OpenAI API has it: `n` > 1, tools and
tool_choice, logprobs, response_format other than text, and for completions echo, suffix,
best_of > 1 and more than one prompt. Unknown fields are accepted and ignored, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from fleetserve.engines.sim import text
from fleetserve.engines.sim.profiles import SimProfile
from fleetserve.errors import InvalidRequestError, ModelNotFoundError
from fleetserve.protocol.openai import ChatCompletionRequest, CompletionRequest
from fleetserve.protocol.sse import DONE, encode_event


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """What a request body asks for and what the engine will answer: a pure function of the
    body and the engine's configuration, so identical bodies may share one plan."""

    chat: bool
    stream: bool
    include_usage: bool
    prompt: tuple[Hashable, ...]
    output: text.PlannedOutput
    model: str

    @property
    def events(self) -> int:
        """Streamed events carrying text: one per token, or one empty one if there is none."""
        return max(1, len(self.output.pieces))

    def usage(self) -> dict[str, int]:
        completion = len(self.output.pieces)
        prompt = len(self.prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


@dataclass(frozen=True, slots=True)
class Job:
    """One accepted request: its plan, plus what differs per request."""

    plan: RequestPlan
    id: str
    created: int


class PlanCache:
    """Remembers the plans of small bodies that come back (benchmarks repeat one body).

    A body's plan is kept from its second sighting on: the first only records the body's hash,
    so a stream of unique bodies (which no cache can help) costs a set insert, not a pile of
    cached objects for the garbage collector to walk. Bounded: bodies up to `max_body_bytes`,
    at most `max_entries` plans and `4 * max_entries` hashes; either starts over when full.
    Planning is pure, so a remembered plan is exactly what planning again would give.
    """

    def __init__(
        self,
        *,
        model: str,
        profile: SimProfile,
        source: text.TextSource,
        engine_seed: int = 0,
        max_entries: int = 256,
        max_body_bytes: int = 4096,
    ) -> None:
        self._args = (model, profile, source, engine_seed)
        self._plans: dict[tuple[bool, bytes], RequestPlan] = {}
        self._seen: set[int] = set()
        self._max_entries = max_entries
        self._max_body_bytes = max_body_bytes

    def plan(self, body: bytes, *, chat: bool) -> RequestPlan:
        key = (chat, body)
        found = self._plans.get(key)
        if found is not None:
            return found
        model, profile, source, engine_seed = self._args
        plan = plan_request(
            body, chat=chat, model=model, profile=profile, source=source, engine_seed=engine_seed
        )
        if len(body) <= self._max_body_bytes:
            fingerprint = hash(key)
            if fingerprint not in self._seen:
                if len(self._seen) >= 4 * self._max_entries:
                    self._seen.clear()
                self._seen.add(fingerprint)
            else:
                if len(self._plans) >= self._max_entries:
                    self._plans.clear()
                self._plans[key] = plan
        return plan


def _validation_error(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return InvalidRequestError(f"request body is not valid JSON: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRequestError("request body must be a JSON object")
    loc = ".".join(str(part) for part in first["loc"])
    param = str(first["loc"][0]) if first["loc"] else None
    return InvalidRequestError(f"{loc}: {first['msg']}", param=param)


def _unsupported(param: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} is not supported by the simulated engine", param=param)


def _check_common(req: ChatCompletionRequest | CompletionRequest, model: str) -> None:
    if req.model != model:
        raise ModelNotFoundError(f"The model `{req.model}` does not exist.", param="model")
    if req.n is not None and req.n > 1:
        raise _unsupported("n", "n > 1")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )


def _chat_prompt(req: ChatCompletionRequest) -> tuple[Sequence[Hashable], str]:
    if req.tools:
        raise _unsupported("tools", "tool calling")
    if req.tool_choice is not None and req.tool_choice != "none":
        raise _unsupported("tool_choice", "tool_choice")
    if req.logprobs or req.top_logprobs:
        raise _unsupported("logprobs", "logprobs")
    if req.response_format is not None and req.response_format.type != "text":
        raise _unsupported("response_format", f"response_format {req.response_format.type!r}")
    turns: list[tuple[str, str]] = []
    for message in req.messages:
        if isinstance(message.content, list):
            for part in message.content:
                if part.type != "text":
                    raise _unsupported("messages", f"content of type {part.type!r}")
        turns.append((message.role, message.text()))
    key = "\x1e".join(f"{role}\x1f{content}" for role, content in turns)
    return text.chat_prompt_tokens(turns), key


def _completion_prompt(req: CompletionRequest) -> tuple[Sequence[Hashable], str]:
    if req.echo:
        raise _unsupported("echo", "echo")
    if req.suffix:
        raise _unsupported("suffix", "suffix")
    if req.best_of is not None and req.best_of > 1:
        raise _unsupported("best_of", "best_of > 1")
    if req.logprobs is not None:
        raise _unsupported("logprobs", "logprobs")
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 and (not prompt or not isinstance(prompt[0], int)):
            raise _unsupported("prompt", "a batch of several prompts")
        if len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]
    if isinstance(prompt, str):
        return text.completion_prompt_tokens(prompt), prompt
    ids: list[Hashable] = [int(t) for t in prompt if isinstance(t, int)]  # token ids, as given
    if len(ids) != len(prompt):
        raise InvalidRequestError(
            "prompt: expected a string or a list of token ids", param="prompt"
        )
    return ids, ",".join(map(str, ids))


def plan_request(
    body: bytes,
    *,
    chat: bool,
    model: str,
    profile: SimProfile,
    source: text.TextSource,
    engine_seed: int = 0,
) -> RequestPlan:
    """Validate a request body and plan its answer; raises ApiError (400, 404) if refused."""
    req: ChatCompletionRequest | CompletionRequest
    try:
        if chat:
            req = ChatCompletionRequest.model_validate_json(body)
        else:
            req = CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_common(req, model)
    if isinstance(req, ChatCompletionRequest):
        prompt, key = _chat_prompt(req)
        limit = req.token_limit
    else:
        prompt, key = _completion_prompt(req)
        limit = req.max_tokens
    room = profile.max_model_len - len(prompt)
    if (limit is not None and limit > room) or room < 1:
        asked = f"{len(prompt)} in the prompt" + (f", {limit} in the completion" if limit else "")
        raise InvalidRequestError(
            f"This model's maximum context length is {profile.max_model_len} tokens. However, "
            f"you requested {len(prompt) + (limit or 0)} tokens ({asked}). Please reduce the "
            "length of the prompt or completion.",
            param="max_tokens" if limit else "messages" if chat else "prompt",
        )
    seed = text.text_seed(req.seed, key, engine_seed)
    natural = None
    if limit is None and not req.ignore_eos:
        natural = text.natural_length(seed)
    output = text.plan_output(
        source,
        seed,
        max_tokens=room if limit is None else limit,
        stop=req.stop_list,
        natural=natural,
        leading_space=not chat,
    )
    return RequestPlan(
        chat=chat,
        stream=bool(req.stream),
        include_usage=req.include_usage,
        prompt=tuple(prompt),
        output=output,
        model=model,
    )


def completion_body(job: Job) -> bytes:
    """The non-streamed response."""
    plan = job.plan
    out = plan.output
    choice: dict[str, object]
    if plan.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": None,
            "finish_reason": out.finish_reason,
        }
        kind = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": out.text,
            "logprobs": None,
            "finish_reason": out.finish_reason,
        }
        kind = "text_completion"
    return orjson.dumps(
        {
            "id": job.id,
            "object": kind,
            "created": job.created,
            "model": plan.model,
            "choices": [choice],
            "usage": plan.usage(),
        }
    )


class StreamEvents:
    """The SSE events of one streamed job, rendered from bytes built once per request.

    Each event is what orjson gives for the event as a dict (same keys, same order, no
    spaces): a constant head and tail around the token's JSON string, so a token costs one
    `orjson.dumps` of its text and a concatenation. With include_usage every event has
    `"usage": null` and the final one (`end`) the usage with no choices, as OpenAI streams it.
    """

    __slots__ = ("_after", "_after_last", "_before", "_before_first", "_job", "_last", "_pieces")

    def __init__(self, job: Job) -> None:
        plan = job.plan
        self._job = job
        self._pieces = plan.output.pieces
        self._last = plan.events - 1
        kind = b"chat.completion.chunk" if plan.chat else b"text_completion"
        head = (
            b'data: {"id":' + orjson.dumps(job.id) + b',"object":"' + kind + b'","created":'
            + str(job.created).encode() + b',"model":' + orjson.dumps(plan.model)
            + b',"choices":[{"index":0,'
        )  # fmt: skip
        if plan.chat:
            self._before_first = head + b'"delta":{"role":"assistant","content":'
            self._before = head + b'"delta":{"content":'
            after = b'},"logprobs":null,"finish_reason":'
        else:
            self._before_first = self._before = head + b'"text":'
            after = b',"logprobs":null,"finish_reason":'
        close = b'}],"usage":null}\n\n' if plan.include_usage else b"}]}\n\n"
        self._after = after + b"null" + close
        self._after_last = after + orjson.dumps(plan.output.finish_reason) + close

    def events(self, start: int, end: int) -> bytes:
        """Events `start` to `end` - 1, one token each; the last event carries finish_reason."""
        pieces, last = self._pieces, self._last
        if end - start == 1 and 0 < start < last:  # the common case: one token mid-stream
            return self._before + orjson.dumps(pieces[start]) + self._after
        parts: list[bytes] = []
        for i in range(start, end):
            piece = orjson.dumps(pieces[i] if i < len(pieces) else "")
            before = self._before_first if i == 0 else self._before
            parts.append(before + piece + (self._after_last if i == last else self._after))
        return b"".join(parts)

    def end(self) -> bytes:
        """The usage event (if asked for) and `data: [DONE]`."""
        return stream_end(self._job)


def stream_events(job: Job, start: int, end: int) -> bytes:
    """Events `start` to `end` - 1 of `job` (`StreamEvents.events`, for one-off use)."""
    return StreamEvents(job).events(start, end)


def stream_end(job: Job) -> bytes:
    """The usage event (if asked for) and `data: [DONE]`."""
    plan = job.plan
    if not plan.include_usage:
        return DONE
    event: dict[str, object] = {
        "id": job.id,
        "object": "chat.completion.chunk" if plan.chat else "text_completion",
        "created": job.created,
        "model": plan.model,
        "choices": [],
        "usage": plan.usage(),
    }
    return encode_event(event) + DONE
