"""OpenAI's chat and completions types, as pydantic models shared by every part of fleetserve.

They describe the wire format, not what one server supports: `n`, `tools`, `logprobs` and the
like are fields here, and a server that does not support them rejects them itself.

Extra fields (the `extra` policy):

* Requests allow unknown fields and keep them (`extra="allow"`), as vLLM's OpenAIBaseModel
  does: clients send vendor extensions (vLLM's `top_k`, `ignore_eos`, ...) and a gateway must
  forward them untouched. vLLM only logs that it ignores them.
* Responses and chunks allow unknown fields too, because upstreams add their own
  (`system_fingerprint`, `service_tier`, vLLM's `prompt_logprobs`), and a parsed response must
  not lose them on the way back out.

Field constraints are OpenAI's documented ranges, so an out-of-range value is a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool | None = None


class ContentPart(_Open):
    """One part of a message's content: `{"type": "text", "text": ...}`, or image, audio, ..."""

    type: str
    text: str | None = None


class ChatMessage(_Open):
    """A message of the conversation; tool calls and the like ride along as extra fields."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; parts other than text contribute nothing."""
        content = self.content
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "\n".join(p.text for p in content if p.type == "text" and p.text is not None)


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _SamplingFields(_Open):
    """Fields common to chat and completions requests."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM extension: keep generating past the end-of-sequence token.
    ignore_eos: bool | None = None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @property
    def token_limit(self) -> int | None:
        """`max_completion_tokens` (the newer name) wins over `max_tokens`."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    # OpenAI's legacy completions default (vLLM's too).
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class AssistantMessage(_Open):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Open):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Open):
    """One streamed event; with include_usage, the last one has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason | None = None


class Completion(_Open):
    """A completions response, and also each of its streamed events (same object name)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Open):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Open):
    """The error envelope (`fleetserve.protocol.envelope` writes it)."""

    error: ErrorDetail
