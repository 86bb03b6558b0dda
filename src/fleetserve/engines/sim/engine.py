"""The SIMULATED engine: one asyncio task stepping the batching model on a Clock.

Requests enter with `submit` and are followed through a `SeqHandle`: how many tokens exist so
far, and whether the request has finished. The step loop sleeps for each step's modelled
duration (`fleetserve.engines.sim.batching`) and then hands out that step's tokens. Step ends
are kept on a deadline grid, so timer slack does not add up over a long generation (a 1 ms
late wake-up shortens the next sleep instead of delaying every later token).

The `instant` profile skips the loop: a request is finished the moment it is submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Sequence

from fleetserve.clock import Clock
from fleetserve.engines.sim.batching import BatchScheduler, FinishReason, SimSequence
from fleetserve.engines.sim.kvcache import block_hashes
from fleetserve.engines.sim.profiles import SimProfile
from fleetserve.engines.sim.stats import (
    EngineStats,
    LoadGauges,
    VllmMetricsCollector,
    build_registry,
)

# Behind by more than this (an overloaded CPU, a suspended process), the loop stops trying to
# catch up on the deadline grid and restarts it from the present.
MAX_LAG_S = 0.25
# Handlers woken per turn of the event loop when a step hands out its tokens (see _hand_out).
HAND_OUT_BATCH = 16


class SeqHandle:
    """A submitted request as its HTTP handler sees it."""

    __slots__ = ("_waiter", "every_token", "seq")

    def __init__(self, seq: SimSequence, *, every_token: bool = True) -> None:
        self.seq = seq
        # A streaming handler wakes for each token; a buffered one only when the request ends.
        self.every_token = every_token
        self._waiter: asyncio.Future[None] | None = None

    @property
    def generated(self) -> int:
        return self.seq.generated

    @property
    def finished(self) -> bool:
        return self.seq.finished

    def progress(self) -> asyncio.Future[None]:
        """A future that resolves at the next token or at the end (at once if finished)."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        if self.seq.finished:
            waiter.set_result(None)
        return waiter

    def notify(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class SimEngine:
    """One simulated replica's scheduler, metrics and step loop."""

    def __init__(self, profile: SimProfile, model_name: str, clock: Clock) -> None:
        self.profile = profile
        self.model_name = model_name
        self.clock = clock
        self.stats = EngineStats(max_model_len=profile.max_model_len)
        self.scheduler = BatchScheduler(profile, self.stats)
        self.registry = build_registry(VllmMetricsCollector(self.stats, self.gauges, model_name))
        self.started_at = clock.now()
        self._handles: dict[SimSequence, SeqHandle] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def gauges(self) -> LoadGauges:
        return self.scheduler.gauges()

    def cold_start_left_s(self) -> float:
        return max(0.0, self.started_at + self.profile.cold_start_s - self.clock.now())

    @property
    def ready(self) -> bool:
        return self.cold_start_left_s() <= 0.0

    async def start(self) -> None:
        """Start the step loop and the cold-start timer (call inside the serving loop)."""
        self.started_at = self.clock.now()
        if self._task is None and not self.profile.instant:
            self._task = asyncio.create_task(self._run(), name="sim-engine-steps")

    async def stop(self) -> None:
        """Stop stepping and abort what is left, waking every waiting handler."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for handle in list(self._handles.values()):
            self.abort(handle)

    def submit(
        self,
        prompt: Sequence[Hashable],
        output_len: int,
        finish_reason: FinishReason = "length",
        *,
        stream: bool = True,
    ) -> SeqHandle:
        """Queue a request of `prompt` tokens that will generate `output_len` tokens.

        Raises batching.CapacityError if the KV cache could never hold it.
        """
        now = self.clock.now()
        profile = self.profile
        seq = SimSequence(
            prompt_len=len(prompt),
            output_len=output_len,
            arrival_s=now,
            finish_reason=finish_reason,
        )
        if profile.instant:
            self._finish_instantly(seq, now)
            return SeqHandle(seq, every_token=stream)
        if profile.prefix_caching:
            seq.block_hashes = block_hashes(prompt, profile.block_size, len(prompt))
        self.scheduler.add(seq)
        handle = SeqHandle(seq, every_token=stream)
        self._handles[seq] = handle
        self._wake.set()
        return handle

    def abort(self, handle: SeqHandle) -> None:
        """The client went away: free the request's batch slot and KV blocks."""
        if self.scheduler.abort(handle.seq, self.clock.now()):
            self._handles.pop(handle.seq, None)
            handle.notify()

    def _finish_instantly(self, seq: SimSequence, now: float) -> None:
        """Everything at once: every phase lasts zero seconds (the histograms' first bucket)."""
        seq.admitted_s = seq.first_token_s = seq.last_token_s = seq.finished_s = now
        seq.computed = seq.prompt_len
        n = seq.generated = seq.output_len
        stats = self.stats
        stats.prompt_tokens += seq.prompt_len
        stats.generation_tokens += n
        stats.finished[seq.finish_reason] += 1
        for hist in (stats.ttft, stats.e2e, stats.queue, stats.prefill, stats.decode,
                     stats.inference):  # fmt: skip
            hist.counts[0] += 1
        stats.itl.counts[0] += n - 1
        if n > 1:
            stats.tpot.counts[0] += 1
        stats.prompt_len.observe(seq.prompt_len)
        stats.generation_len.observe(n)

    async def _run(self) -> None:
        clock, scheduler, wake = self.clock, self.scheduler, self._wake
        step_end: float | None = None
        woken: list[SeqHandle] = []
        while True:
            wake.clear()  # a request submitted from here on sets it again
            now = clock.now()
            plan = scheduler.plan(now)
            # The last step's tokens go out once the next step is laid out (at its end, as
            # before any handler ran); requests that come in meanwhile wait for the step after.
            await self._hand_out(woken)
            if plan is None:
                step_end = None
                await wake.wait()
                woken = []
                continue
            start = now if step_end is None or now - step_end > MAX_LAG_S else step_end
            step_end = start + plan.duration_s
            await clock.sleep(max(0.0, step_end - clock.now()))
            woken = self._to_wake(scheduler.complete(plan, step_end))

    def _to_wake(self, produced: list[SimSequence]) -> list[SeqHandle]:
        """The handlers a step's tokens wake, in order: those that go on, then those that end.

        A client that waits for one request to end before it sends the next (a closed loop)
        then finds the engine done with the step's writes, instead of queued behind them, when
        that next request arrives.
        """
        handles = self._handles
        going_on: list[SeqHandle] = []
        ending: list[SeqHandle] = []
        for seq in produced:
            handle = handles.get(seq)
            if handle is None:
                continue
            if seq.finished_s is not None:
                del handles[seq]
                ending.append(handle)
            elif handle.every_token:
                going_on.append(handle)
        going_on += ending
        return going_on

    async def _hand_out(self, woken: list[SeqHandle]) -> None:
        """Wake `woken` (the handlers run, and write, in this order), HAND_OUT_BATCH at a time.

        Between two batches the loop polls its sockets, so a request that comes in during a
        large step's writes is read after one batch of them rather than after all (its
        arrival is stamped then; what it waits in the socket, no stamp can see).
        """
        for i, handle in enumerate(woken, 1):
            handle.notify()
            if i % HAND_OUT_BATCH == 0 and i < len(woken):
                await asyncio.sleep(0)  # a yield to the loop, not a wait: no clock involved
