"""Deterministic tokens and text for the SIMULATED engine.

The tokenizer is a regex, not a model vocabulary: a token is a word with the whitespace before
it, one punctuation character with the whitespace before it, or trailing whitespace. It is
stable across processes and versions, so token counts in `usage`, in the engine's metrics and
in a client that re-tokenizes the text always agree.

Generated text is a run of such tokens from a fixed vocabulary (a 64-bit linear congruential
generator draws them), chosen by the request's `seed` or else by a CRC-32 of the prompt, so
the same request gives the same answer on every replica and run. Concatenating the pieces and
re-tokenizing gives back exactly the pieces, which keeps `completion_tokens` honest.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")

# Chat prompts are counted as a Llama 3 chat template renders them:
#   <|begin_of_text|> + per message <|start_header_id|>ROLE<|end_header_id|>"\n\n"CONTENT<|eot_id|>
#   + the generation prompt <|start_header_id|>assistant<|end_header_id|>"\n\n".
# So prompt_tokens = CHAT_PRIMING_TOKENS + sum(CHAT_MESSAGE_OVERHEAD_TOKENS + tokens(content)).
CHAT_MESSAGE_OVERHEAD_TOKENS = 5
CHAT_PRIMING_TOKENS = 5
# Completions prompts get a beginning-of-text token, as vLLM adds for Llama.
COMPLETION_BOS_TOKENS = 1

BOS = "<|begin_of_text|>"
_HEADER_START, _HEADER_END, _EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

# Natural answer length (an end-of-sequence token) when the client sets no max_tokens.
NATURAL_MIN_TOKENS = 16
NATURAL_SPAN_TOKENS = 241

_WORDS = """the of and to in is that for it as was with be by on not he this are or his from at
    which but have an they you were her she there one all we their has been if more when will would
    who so no can time only new some could these two may first then do any like my now over such
    our man me even most made after also did many before must through back years where much your
    way well down should because each just those people how too little state good very make world
    still own see men work long get here between both life being under never day same another know
    while last might us great old year off come since against go came right used take three small
    large next early young important few public bad able fleet replica model token batch cache
    queue request stream answer latency engine signal scale simple quiet river stone light green"""
_VOCAB = tuple(_WORDS.split())
_PUNCT = (",", ".")
_MASK = (1 << 64) - 1
_MUL, _INC = 6364136223846793005, 1442695040888963407

FinishReason = Literal["stop", "length"]


def tokenize(text: str) -> list[str]:
    return _PIECE.findall(text)


def count_tokens(text: str) -> int:
    return len(_PIECE.findall(text))


def chat_prompt_tokens(messages: Sequence[tuple[str, str]]) -> list[str]:
    """The rendered chat prompt as tokens: template markers, roles and content pieces.

    Prefix caching hashes these, so conversations that share a system prompt share blocks.
    """
    tokens = [BOS]
    for role, content in messages:
        tokens += (_HEADER_START, role, _HEADER_END, "\n\n")
        tokens += _PIECE.findall(content)
        tokens.append(_EOT)
    tokens += (_HEADER_START, "assistant", _HEADER_END, "\n\n")
    return tokens


def completion_prompt_tokens(prompt: str) -> list[str]:
    tokens = [BOS]
    tokens += _PIECE.findall(prompt)
    return tokens


def text_seed(request_seed: int | None, prompt_key: str, engine_seed: int = 0) -> int:
    """The request's own seed wins; otherwise the prompt decides, mixed with the engine's seed."""
    if request_seed is not None:
        return request_seed & _MASK
    return (zlib.crc32(prompt_key.encode("utf-8", "surrogatepass")) ^ (engine_seed * _MUL)) & _MASK


def natural_length(seed: int) -> int:
    """How long the simulated model talks before its end-of-sequence token."""
    return NATURAL_MIN_TOKENS + ((seed * _MUL + _INC) & _MASK) % NATURAL_SPAN_TOKENS


def generate_pieces(seed: int, count: int, *, leading_space: bool) -> list[str]:
    """`count` tokens of text. The first has no leading space unless `leading_space`."""
    pieces: list[str] = []
    state = seed & _MASK
    vocab, n_vocab = _VOCAB, len(_VOCAB)
    since_punct = 0
    for i in range(count):
        state = (state * _MUL + _INC) & _MASK
        draw = state >> 33
        if since_punct >= 4 and draw % 7 == 0:
            pieces.append(_PUNCT[(draw >> 3) & 1])
            since_punct = 0
            continue
        word = vocab[(draw >> 3) % n_vocab]
        pieces.append(word if i == 0 and not leading_space else " " + word)
        since_punct += 1
    return pieces


class TextSource:
    """Generated text as slices of one fixed, cyclic tape of tokens.

    Drawing each token on demand costs more than everything else a request does under the
    `instant` profile, so the tape is drawn once (about 10 ms for the default 16,384 tokens)
    and an answer is the slice starting at `seed mod length`. Same seed, same text, in every
    process: the tape depends only on `tape_seed` and `length`.
    """

    def __init__(self, length: int = 1 << 14, tape_seed: int = 0x5EED) -> None:
        self._tape = tuple(generate_pieces(tape_seed, length, leading_space=True))

    def pieces(self, seed: int, count: int, *, leading_space: bool) -> list[str]:
        tape = self._tape
        size = len(tape)
        start = seed % size
        if tape[start] in _PUNCT:  # never two in a row, so the next one is a word
            start = (start + 1) % size
        if start + count <= size:
            out = list(tape[start : start + count])
        else:
            out = list(tape[start:])
            remaining = count - len(out)
            while remaining > 0:
                take = min(remaining, size)
                out += tape[:take]
                remaining -= take
        if out and not leading_space:
            out[0] = out[0][1:]
        return out


@dataclass(frozen=True, slots=True)
class PlannedOutput:
    """What a request will produce, decided before it is scheduled.

    `steps` is how many tokens the engine generates (what it spends time and KV on);
    `pieces` is the text returned, one streamed chunk each. They differ when the text ends
    early: an end-of-sequence token is generated but has no text, and the tokens that completed
    a stop string are generated but cut.
    """

    pieces: tuple[str, ...]
    steps: int
    finish_reason: FinishReason

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def plan_output(
    source: TextSource,
    seed: int,
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    natural: int | None = None,
    leading_space: bool = False,
) -> PlannedOutput:
    """Generate up to `max_tokens`, or `natural` tokens and then an end-of-sequence token.

    The end-of-sequence token costs a step but adds no text (finish_reason "stop"). A stop
    string ends generation at the token that completes it; the text is cut where the stop
    string begins (OpenAI excludes it), which may leave part of a word as the last piece.
    """
    reason: FinishReason
    if natural is not None and natural < max_tokens:
        limit, steps, reason = natural, natural + 1, "stop"
    else:
        limit, steps, reason = max_tokens, max_tokens, "length"
    pieces = source.pieces(seed, limit, leading_space=leading_space)
    stops = [s for s in stop if s]
    if not stops:
        return PlannedOutput(tuple(pieces), steps, reason)
    text = "".join(pieces)
    cut = -1
    cut_end = 0
    for s in stops:
        at = text.find(s)
        if at >= 0 and (cut < 0 or at + len(s) < cut_end):
            cut, cut_end = at, at + len(s)
    if cut < 0:
        return PlannedOutput(tuple(pieces), steps, reason)
    kept: list[str] = []
    pos = 0
    steps = 0
    for piece in pieces:
        end = pos + len(piece)
        steps += 1
        if end >= cut_end:
            break
        pos = end
    pos = 0
    for piece in pieces:
        end = pos + len(piece)
        if end <= cut:
            kept.append(piece)
        else:
            if pos < cut:
                kept.append(piece[: cut - pos])
            break
        pos = end
    return PlannedOutput(tuple(kept), steps, "stop")
