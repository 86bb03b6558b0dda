"""Request builders for `fleetserve bench` (and the Locust example): bodies as bytes, seeded.

Token lengths without a tokenizer: a prompt of N tokens is N words drawn from a fixed
vocabulary of short, common, lower-case English words, joined by single spaces. Each such
word (with the space before it) is one token in the usual BPE tokenizers (Llama 3, GPT-4's
cl100k and o200k, Qwen, Mistral) and exactly one token in the simulated engine, whose
tokenizer counts `\\s*\\w+` as one token (`engines/sim/text.py`). Servers add their own
overhead on top: a chat template (the simulated engine counts 5 tokens plus 5 per message) or
a beginning-of-text token for completions.

Output length is asked for with `max_tokens` only: `ignore_eos` and `min_tokens` are not
OpenAI's API, so a model may stop early, and the server's `usage` tells how many it made.

Nothing here uses asyncio, so Locust (gevent) can build the same requests.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from fleetserve.bench.lengths import Fixed, Length
from fleetserve.bench.schedule import TraceEntry
from fleetserve.errors import ConfigError

Api = Literal["chat", "completions"]
PATHS: dict[Api, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

_WORDS = """the of and to in is that for it as was with be by on not he this are or his from at
    which but have an they you were her she there one all we their has been if more when will
    who so no can time only new some could these two may first then do any like my now over
    our man me even most made after also did many before must through back years where much
    way well down should because each just those people how too little state good very make
    still own see men work long get here between both life being under never day same another
    while last might us great old year off come since against go came right used take three
    large next early young important few public bad able water light green house world small"""
VOCABULARY = tuple(_WORDS.split())
DEFAULT_LENGTH = Fixed(128)
TAPE_WORDS = 1 << 16  # prompts are slices of one seeded tape of this many words


class PromptText:
    """N-token prompts as slices of a seeded tape of words: O(N) per prompt, no per-word draws."""

    def __init__(self, seed: int, words: int = TAPE_WORDS) -> None:
        rng = random.Random(seed)
        tape = [VOCABULARY[rng.randrange(len(VOCABULARY))] for _ in range(words)]
        self._text = " " + " ".join(tape + tape)  # doubled: a slice may wrap around
        self._starts: list[int] = []  # index in _text of the space before word i
        at = 0
        for word in tape + tape:
            self._starts.append(at)
            at += 1 + len(word)
        self._starts.append(at)
        self.words = words

    def prompt(self, start: int, tokens: int) -> str:
        """`tokens` words from word `start` of the tape (wrapping), without a leading space."""
        start %= self.words
        whole, rest = divmod(tokens, self.words)
        parts = [self._text[1 : self._starts[self.words]]] * whole
        if rest:
            parts.append(self._text[self._starts[start] + 1 : self._starts[start + rest]])
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class DatasetRow:
    """One request from a dataset file: a prompt or chat messages, and maybe an output length."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    model: str
    api: Api = "chat"
    stream: bool = True
    prompt_tokens: Length = DEFAULT_LENGTH
    output_tokens: Length = DEFAULT_LENGTH
    prefix_groups: int = 0  # > 0: requests share one of this many system prompts
    prefix_tokens: int = 0  # the length of each shared system prompt
    dataset: tuple[DatasetRow, ...] = ()  # when given, prompts come from here, in order
    extra_body: Mapping[str, object] = field(default_factory=dict)  # temperature, ...

    def __post_init__(self) -> None:
        if self.api not in PATHS:
            raise ConfigError(f"api must be 'chat' or 'completions', got {self.api!r}")
        if self.prefix_groups < 0 or self.prefix_tokens < 0:
            raise ConfigError("prefix groups and tokens must be >= 0")
        if (self.prefix_groups > 0) != (self.prefix_tokens > 0):
            raise ConfigError("a shared-prefix workload needs both groups and tokens > 0")
        if self.api == "completions" and any(r.prompt is None for r in self.dataset):
            raise ConfigError("completions need a 'prompt' in every dataset row, not messages")


@dataclass(frozen=True, slots=True)
class BuiltRequest:
    """A request ready to send: its path, its body as bytes, and what it asks for."""

    path: str
    body: bytes
    stream: bool
    output_tokens: int  # max_tokens asked for
    prompt_tokens: int | None = None  # words in the prompt content (None: dataset text)
    group: str | None = None


class Workload:
    """Builds requests one after another; the same spec and seed give the same bodies."""

    def __init__(self, spec: WorkloadSpec, *, seed: int = 0) -> None:
        self.spec = spec
        self._rng = random.Random(seed)
        self._text = PromptText(seed)
        self._row = 0
        self._prefixes = [
            self._text.prompt(random.Random(f"{seed}/prefix/{g}").randrange(TAPE_WORDS),
                              spec.prefix_tokens)
            for g in range(spec.prefix_groups)
        ]  # fmt: skip

    def next(self) -> BuiltRequest:
        spec = self.spec
        if spec.dataset:
            row = spec.dataset[self._row % len(spec.dataset)]
            self._row += 1
            output = row.output_tokens or spec.output_tokens.draw(self._rng)
            if row.messages is not None and spec.api == "chat":
                return self._chat(list(row.messages), output, None, None)
            return self._shape(row.prompt or "", output, None)
        return self._generated(spec.prompt_tokens.draw(self._rng), None)

    def for_trace(self, entry: TraceEntry) -> BuiltRequest:
        """A trace entry's request: its own prompt or lengths, the spec's where it has none."""
        output = entry.output_tokens or self.spec.output_tokens.draw(self._rng)
        if entry.prompt is not None:
            return self._shape(entry.prompt, output, None)
        prompt = entry.prompt_tokens or self.spec.prompt_tokens.draw(self._rng)
        return self._generated(prompt, output)

    def _generated(self, prompt_tokens: int, output: int | None) -> BuiltRequest:
        out = output if output is not None else self.spec.output_tokens.draw(self._rng)
        text = self._text.prompt(self._rng.randrange(TAPE_WORDS), prompt_tokens)
        return self._shape(text, out, prompt_tokens)

    def _shape(self, text: str, output: int, prompt_tokens: int | None) -> BuiltRequest:
        """Put the shared prefix (if any) in front of the text, as a system message for chat."""
        group = None
        if self._prefixes:
            g = self._rng.randrange(len(self._prefixes))
            group, prefix = f"g{g}", self._prefixes[g]
            if prompt_tokens is not None:
                prompt_tokens += self.spec.prefix_tokens
            if self.spec.api == "completions":
                return self._completion(f"{prefix} {text}", output, prompt_tokens, group)
            messages = [("system", prefix), ("user", text)]
            return self._chat(messages, output, prompt_tokens, group)
        if self.spec.api == "completions":
            return self._completion(text, output, prompt_tokens, None)
        return self._chat([("user", text)], output, prompt_tokens, None)

    def _chat(
        self,
        messages: Sequence[tuple[str, str]],
        output: int,
        prompt_tokens: int | None,
        group: str | None,
    ) -> BuiltRequest:
        body: dict[str, object] = {"messages": [{"role": r, "content": c} for r, c in messages]}
        return self._finish("chat", body, output, prompt_tokens, group)

    def _completion(
        self, prompt: str, output: int, prompt_tokens: int | None, group: str | None
    ) -> BuiltRequest:
        return self._finish("completions", {"prompt": prompt}, output, prompt_tokens, group)

    def _finish(
        self,
        api: Api,
        body: dict[str, object],
        output: int,
        prompt_tokens: int | None,
        group: str | None,
    ) -> BuiltRequest:
        spec = self.spec
        payload: dict[str, object] = {"model": spec.model, **body, "max_tokens": output}
        if spec.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        payload.update(spec.extra_body)
        return BuiltRequest(
            PATHS[api], orjson.dumps(payload), spec.stream, output, prompt_tokens, group
        )


# --- dataset files ------------------------------------------------------------------------------


def _output(value: object, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        count = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(f"{where}: output length {value!r} is not a whole number") from None
    if isinstance(count, bool) or count < 1:
        raise ConfigError(f"{where}: output length {value!r} must be >= 1")
    return count


def _row(raw: Mapping[str, object], where: str) -> DatasetRow:
    output = _output(raw.get("output_tokens", raw.get("max_tokens")), where)
    prompt, messages = raw.get("prompt"), raw.get("messages")
    if isinstance(prompt, str) and prompt:
        return DatasetRow(prompt=prompt, output_tokens=output)
    if isinstance(messages, list) and messages:
        pairs = []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise ConfigError(f"{where}: each message needs a string 'content'")
            pairs.append((str(message.get("role", "user")), message["content"]))
        return DatasetRow(messages=tuple(pairs), output_tokens=output)
    raise ConfigError(f"{where}: needs a non-empty 'prompt' or 'messages'")


def read_dataset(path: Path) -> tuple[DatasetRow, ...]:
    """Rows of a `.jsonl` file (prompt or messages) or a CSV file (a `prompt` column), each
    with an optional `output_tokens` (or `max_tokens`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read dataset {path}: {error}") from error
    rows: list[DatasetRow] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ConfigError(f"{path}:{line}: not valid JSON") from None
            if not isinstance(item, dict):
                raise ConfigError(f"{path}:{line}: expected a JSON object")
            rows.append(_row(item, f"{path}:{line}"))
    else:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise ConfigError(f"{path}: the CSV header has no 'prompt' column")
        for record in reader:
            rows.append(_row(dict(record), f"{path}:{reader.line_num}"))
    if not rows:
        raise ConfigError(f"dataset {path} has no requests")
    return tuple(rows)
