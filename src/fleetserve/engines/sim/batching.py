"""Continuous batching with chunked prefill: the simulated engine's latency model, kept pure.

One engine step is one forward pass. Each step, like vLLM V1's scheduler:

1. running requests are served first, in admission order, from a token budget of
   `max_num_batched_tokens`: one token each for those decoding, the rest of their prompt (up
   to what the budget has left) for those still in prefill;
2. waiting requests are then admitted first-come first-served while the budget lasts, fewer
   than `max_num_seqs` run, and the KV cache can hold all they will need
   (`fleetserve.engines.sim.kvcache`). The head of the queue blocks the rest, as in vLLM's
   FCFS policy. Blocks cached from earlier prompts skip prefill.
3. the step lasts ``decode_base_s + decode_per_seq_s * b + prefill_tokens / prefill_rate``,
   where b counts the requests that sample a token in it (every decoding request, and every
   request whose prefill completes in it). Prefill is modelled as vLLM's chunked prefill: it
   shares the step with the decodes and adds its compute time to the step.

A request's first token comes at the end of the step that completes its prompt, each later
token at the end of one more step. Nothing here reads a clock or sleeps: callers pass `now`
in, so the same code runs under the asyncio engine and in the cluster simulator.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from fleetserve.engines.sim.kvcache import BlockPool, cacheable_blocks
from fleetserve.engines.sim.profiles import SimProfile
from fleetserve.engines.sim.stats import EngineStats, LoadGauges

FinishReason = Literal["stop", "length", "abort"]


class CapacityError(ValueError):
    """The request can never fit this engine's KV cache, however long it waits."""


@dataclass(eq=False, slots=True)
class SimSequence:
    """One request inside the engine. Identity, not value, makes two sequences different."""

    prompt_len: int
    output_len: int  # tokens it will generate (steps it decodes for)
    arrival_s: float
    finish_reason: FinishReason = "length"
    block_hashes: tuple[int, ...] = ()  # hashes of the prompt's cacheable full blocks
    # Set by the scheduler:
    computed: int = 0  # prompt tokens computed (or found in the prefix cache)
    generated: int = 0
    admitted_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None
    cached_tokens: int = 0
    private_blocks: int = 0
    pinned: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finished_s is not None

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What one step computes, and how long it takes."""

    duration_s: float
    prefill: tuple[tuple[SimSequence, int], ...]  # (sequence, prompt tokens computed now)
    decode: tuple[SimSequence, ...]


class BatchScheduler:
    """Admission, batching and timing of one engine; `plan` a step, then `complete` it."""

    def __init__(self, profile: SimProfile, stats: EngineStats) -> None:
        self.profile = profile
        self.stats = stats
        self.pool = BlockPool(profile.kv_blocks, prefix_caching=profile.prefix_caching)
        self.waiting: deque[SimSequence] = deque()
        self.running: list[SimSequence] = []

    def gauges(self) -> LoadGauges:
        return LoadGauges(len(self.running), len(self.waiting), self.pool.usage_frac)

    def blocks_needed(self, seq: SimSequence) -> int:
        return math.ceil((seq.prompt_len + seq.output_len) / self.profile.block_size)

    def add(self, seq: SimSequence) -> None:
        """Queue a request; CapacityError if it could never be admitted."""
        need = self.blocks_needed(seq)
        if need > self.pool.num_blocks:
            raise CapacityError(
                f"the request needs {need * self.profile.block_size} tokens of KV cache "
                f"({seq.prompt_len} prompt + {seq.output_len} generated); this engine holds "
                f"{self.pool.num_blocks * self.profile.block_size}"
            )
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def plan(self, now: float) -> StepPlan | None:
        """Admit what fits and lay out the next step; None when there is nothing to do."""
        budget = self.profile.max_num_batched_tokens
        prefill: list[tuple[SimSequence, int]] = []
        decode: list[SimSequence] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.prefilling:
                chunk = min(seq.prompt_len - seq.computed, budget)
                prefill.append((seq, chunk))
                budget -= chunk
            else:
                decode.append(seq)
                budget -= 1
        while self.waiting and budget > 0 and len(self.running) < self.profile.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, now):
                break
            self.waiting.popleft()
            self.running.append(seq)
            chunk = min(seq.prompt_len - seq.computed, budget)
            prefill.append((seq, chunk))
            budget -= chunk
        if not prefill and not decode:
            return None
        samplers = len(decode) + sum(
            1 for seq, chunk in prefill if seq.computed + chunk >= seq.prompt_len
        )
        prefill_tokens = sum(chunk for _, chunk in prefill)
        duration = self.profile.decode_step_s(samplers) + self.profile.prefill_s(prefill_tokens)
        return StepPlan(duration, tuple(prefill), tuple(decode))

    def _admit(self, seq: SimSequence, now: float) -> bool:
        block = self.profile.block_size
        hashes = seq.block_hashes[: cacheable_blocks(seq.prompt_len, block)]
        hits = self.pool.lookup(hashes)
        hit_hashes = hashes[:hits]
        new_blocks = self.blocks_needed(seq) - hits
        if not self.pool.can_allocate(new_blocks, hit_hashes):
            return False
        self.pool.allocate(new_blocks, hit_hashes)
        seq.pinned = list(hit_hashes)
        seq.private_blocks = new_blocks
        seq.cached_tokens = seq.computed = hits * block
        seq.admitted_s = now
        if self.pool.prefix_caching:
            self.stats.prefix_queries += seq.prompt_len
            self.stats.prefix_hits += seq.cached_tokens
        return True

    def complete(self, plan: StepPlan, now: float) -> list[SimSequence]:
        """Apply a planned step that ended at `now`; returns the sequences that got a token.

        Sequences aborted while the step ran are skipped.
        """
        produced: list[SimSequence] = []
        stats = self.stats
        for seq, chunk in plan.prefill:
            if seq.finished:
                continue
            seq.computed += chunk
            if seq.computed < seq.prompt_len:
                continue
            fresh = seq.block_hashes[len(seq.pinned) :]
            promoted = self.pool.promote(fresh)
            seq.pinned += promoted
            seq.private_blocks -= len(promoted)
            seq.first_token_s = seq.last_token_s = now
            seq.generated = 1
            stats.prompt_tokens += seq.prompt_len
            stats.ttft.observe(now - seq.arrival_s)
            produced.append(seq)
        for seq in plan.decode:
            if seq.finished:
                continue
            seq.generated += 1
            if seq.last_token_s is not None:
                stats.itl.observe(now - seq.last_token_s)
            seq.last_token_s = now
            produced.append(seq)
        stats.generation_tokens += len(produced)
        done = False
        for seq in produced:
            if seq.generated >= seq.output_len:
                self._finish(seq, now, seq.finish_reason)
                done = True
        if done:
            self.running = [s for s in self.running if not s.finished]
        return produced

    def abort(self, seq: SimSequence, now: float) -> bool:
        """Drop a request (its client went away) and free what it held; False if already done."""
        if seq.finished:
            return False
        if seq.admitted_s is None:
            self.waiting.remove(seq)
            seq.finished_s = now
            seq.finish_reason = "abort"
            self.stats.finished["abort"] += 1
            return True
        self._finish(seq, now, "abort")
        self.running.remove(seq)
        return True

    def _finish(self, seq: SimSequence, now: float, reason: FinishReason) -> None:
        seq.finished_s = now
        seq.finish_reason = reason
        self.pool.release(seq.pinned, seq.private_blocks)
        seq.pinned, seq.private_blocks = [], 0
        stats = self.stats
        stats.finished[reason] += 1
        if reason == "abort":
            return
        record_finished(stats, seq)


def record_finished(stats: EngineStats, seq: SimSequence) -> None:
    """The per-request histograms of a finished request, with vLLM's phase boundaries."""
    admitted = seq.admitted_s if seq.admitted_s is not None else seq.arrival_s
    first = seq.first_token_s if seq.first_token_s is not None else admitted
    last = seq.last_token_s if seq.last_token_s is not None else first
    end = seq.finished_s if seq.finished_s is not None else last
    stats.e2e.observe(end - seq.arrival_s)
    stats.queue.observe(admitted - seq.arrival_s)
    stats.prefill.observe(first - admitted)
    stats.decode.observe(last - first)
    stats.inference.observe(last - admitted)
    if seq.generated > 1:
        stats.tpot.observe((last - first) / (seq.generated - 1))
    stats.prompt_len.observe(seq.prompt_len)
    stats.generation_len.observe(seq.generated)
