"""What the gateway needs to know about a request body, read once without re-encoding it.

The body is forwarded byte for byte; only these fields are looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from fleetserve.errors import InvalidRequestError

# Characters of prompt text used as the prefix-affinity key: long enough to tell system
# prompts apart, short enough to hash quickly.
PREFIX_KEY_CHARS = 256


@dataclass(frozen=True, slots=True)
class RequestInfo:
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prefix_key: str
    has_stream_options: bool = False


def _prompt_prefix(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            text = f"{message.get('role', '')}:{content or ''}\n"
            parts.append(text)
            size += len(text)
            if size >= PREFIX_KEY_CHARS:
                break
        return "".join(parts)[:PREFIX_KEY_CHARS]
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return str(prompt)[:PREFIX_KEY_CHARS] if prompt is not None else ""


def inspect_request(raw: bytes, *, chat: bool) -> RequestInfo:
    """Parse just enough of an OpenAI request to route it; raise a 400 if it is not one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' is required and must be a string", param="model")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError(
                "'messages' is required and must be a non-empty array", param="messages"
            )
    elif "prompt" not in body:
        raise InvalidRequestError("'prompt' is required", param="prompt")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise InvalidRequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise InvalidRequestError("'max_tokens' must be a positive integer", param="max_tokens")
    return RequestInfo(
        model=model,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens=max_tokens,
        prefix_key=_prompt_prefix(body),
        has_stream_options="stream_options" in body,
    )


_USAGE_OPTION = b'{"stream_options":{"include_usage":true},'


def rewrite_body(
    raw: bytes, info: RequestInfo, *, include_usage: bool, max_tokens: int | None
) -> bytes:
    """The body with `stream_options.include_usage` set and/or `max_tokens` capped: the only
    rewrites the gateway makes (tenancy: usage for the ledger, a budget's cap). Asking for
    usage alone splices the field in without re-encoding the body."""
    if max_tokens is None and not include_usage:
        return raw
    if max_tokens is None and not info.has_stream_options:
        start = raw.find(b"{")  # inspect_request saw a JSON object with a model in it
        return raw[:start] + _USAGE_OPTION + raw[start + 1 :]
    body = orjson.loads(raw)
    if include_usage:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}  # fmt: skip
    if max_tokens is not None:
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = max_tokens
    return orjson.dumps(body)
