"""The simulated engine's latency model and scheduler, on a FakeClock (no real sleeping)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fleetserve.engines.sim.batching import CapacityError
from fleetserve.engines.sim.engine import SeqHandle, SimEngine
from fleetserve.engines.sim.profiles import PROFILES, SimProfile
from fleetserve.testing.clock import FakeClock

# Round numbers, so expected times can be written down: a step is 10 ms + 1 ms per sampled
# sequence, prefill runs at 1,000 tokens/s, and the KV cache holds 1,024 tokens (64 blocks).
TEST_PROFILE = SimProfile(
    name="test",
    description="test profile",
    decode_base_s=0.010,
    decode_per_seq_s=0.001,
    prefill_tokens_per_s=1000.0,
    max_num_seqs=4,
    max_num_batched_tokens=256,
    kv_capacity_tokens=1024,
    max_model_len=1024,
    cold_start_s=0.0,
)


def profile(**changes: object) -> SimProfile:
    return dataclasses.replace(TEST_PROFILE, **changes)  # type: ignore[arg-type]


def prompt(n: int, tag: str) -> list[str]:
    """n distinct tokens; prompts with different tags share no prefix."""
    return [f"{tag}{i}" for i in range(n)]


async def run(engine: SimEngine, clock: FakeClock) -> None:
    await clock.run_until_idle(max_s=600)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def started(p: SimProfile, clock: FakeClock) -> SimEngine:
    engine = SimEngine(p, "m", clock)
    await engine.start()
    return engine


def step(batch: int, p: SimProfile = TEST_PROFILE) -> float:
    return p.decode_base_s + p.decode_per_seq_s * batch


@pytest.mark.parametrize(
    ("prompt_len", "output_len", "first_token_s", "end_s"),
    [
        pytest.param(10, 1, 0.010 + step(1), 0.010 + step(1), id="one-token"),
        pytest.param(100, 5, 0.100 + step(1), 0.100 + 5 * step(1), id="prefill-then-decode"),
        # 600 tokens with a 256-token budget: chunks of 256 and 256 (forward passes without a
        # sampled token) and 88 (which samples the first token).
        pytest.param(600, 3, 0.600 + 2 * 0.010 + step(1), 0.620 + 3 * step(1), id="chunked"),
    ],
)
async def test_single_request_is_prefill_plus_one_step_per_token(
    clock: FakeClock, prompt_len: int, output_len: int, first_token_s: float, end_s: float
) -> None:
    engine = await started(TEST_PROFILE, clock)
    handle = engine.submit(prompt(prompt_len, "a"), output_len)
    await run(engine, clock)
    seq = handle.seq
    assert handle.finished
    assert seq.generated == output_len
    assert seq.first_token_s == pytest.approx(first_token_s)
    assert seq.finished_s == pytest.approx(end_s)
    assert TEST_PROFILE.single_request_s(prompt_len, output_len) == pytest.approx(end_s)
    await engine.stop()


@pytest.mark.parametrize(
    ("max_num_seqs", "requests"),
    [
        pytest.param(1, 2, id="one-slot"),
        pytest.param(2, 3, id="limit-plus-one"),
        pytest.param(4, 5, id="four-slots"),
    ],
)
async def test_the_request_past_the_batch_limit_waits_for_a_slot(
    clock: FakeClock, max_num_seqs: int, requests: int
) -> None:
    engine = await started(profile(max_num_seqs=max_num_seqs), clock)
    handles = [engine.submit(prompt(8, f"r{i}"), 4) for i in range(requests)]
    await clock.advance(0.001)  # inside the first step
    assert engine.gauges().running == max_num_seqs
    assert engine.gauges().waiting == requests - max_num_seqs
    await run(engine, clock)
    first_wave, last = handles[:max_num_seqs], handles[-1].seq
    assert all(h.seq.admitted_s == 0.0 for h in first_wave)
    assert last.admitted_s == pytest.approx(max(h.seq.finished_s or 0.0 for h in first_wave))
    # The whole first wave decodes together: 8-token prefills in one step, then 3 more steps.
    wave_end = max_num_seqs * 8 / 1000 + 4 * step(max_num_seqs)
    assert first_wave[0].seq.finished_s == pytest.approx(wave_end)
    assert engine.stats.queue.count == requests
    await engine.stop()


@pytest.mark.parametrize(
    ("kv_tokens", "first", "second", "second_waits"),
    [
        # 64 tokens = 4 blocks; 20+20 tokens need 3 blocks, 10+10 need 2: no room for both.
        pytest.param(64, (20, 20), (10, 10), True, id="full-cache-waits"),
        pytest.param(80, (20, 20), (10, 10), False, id="room-for-both"),
        pytest.param(64, (8, 8), (8, 8), False, id="one-block-each"),
    ],
)
async def test_a_request_waits_while_the_kv_cache_cannot_hold_it(
    clock: FakeClock,
    kv_tokens: int,
    first: tuple[int, int],
    second: tuple[int, int],
    second_waits: bool,
) -> None:
    engine = await started(profile(kv_capacity_tokens=kv_tokens), clock)
    a = engine.submit(prompt(first[0], "a"), first[1])
    b = engine.submit(prompt(second[0], "b"), second[1])
    await clock.advance(0.001)
    gauges = engine.gauges()
    assert gauges.running == (1 if second_waits else 2)
    blocks = math.ceil(sum(first) / 16) + (0 if second_waits else math.ceil(sum(second) / 16))
    assert gauges.kv_usage_frac == pytest.approx(blocks / (kv_tokens // 16))
    await run(engine, clock)
    if second_waits:
        assert b.seq.admitted_s == pytest.approx(a.seq.finished_s)
    else:
        assert b.seq.admitted_s == 0.0
    assert engine.gauges().kv_usage_frac == 0.0
    await engine.stop()


def test_a_request_larger_than_the_whole_cache_is_refused(clock: FakeClock) -> None:
    engine = SimEngine(profile(kv_capacity_tokens=64), "m", clock)
    with pytest.raises(CapacityError, match="needs 80 tokens"):
        engine.submit(prompt(60, "a"), 10)


@pytest.mark.parametrize(
    ("shared", "cached"),
    [
        pytest.param(0, 0, id="nothing-shared"),
        pytest.param(40, 32, id="two-whole-blocks"),  # only whole 16-token blocks are reused
        pytest.param(64, 48, id="same-prompt"),  # the last token is always computed
    ],
)
async def test_a_prefix_cache_hit_skips_that_part_of_prefill(
    clock: FakeClock, shared: int, cached: int
) -> None:
    engine = await started(TEST_PROFILE, clock)
    first = prompt(64, "p")
    engine.submit(first, 1)
    await run(engine, clock)
    start = clock.now()
    second = first[:shared] + prompt(64 - shared, "q")
    handle = engine.submit(second, 1)
    await run(engine, clock)
    assert handle.seq.cached_tokens == cached
    expected_ttft = (64 - cached) / 1000 + step(1)
    assert (handle.seq.first_token_s or 0.0) - start == pytest.approx(expected_ttft)
    assert engine.stats.prefix_queries == 128
    assert engine.stats.prefix_hits == cached
    await engine.stop()


async def test_cached_blocks_are_evicted_least_recently_freed_first(clock: FakeClock) -> None:
    # 4 blocks in all. A fills 2 blocks and leaves them cached; B needs all 4 blocks and
    # evicts A's; then A's prompt again finds nothing.
    engine = await started(profile(kv_capacity_tokens=64), clock)
    a_prompt = prompt(32, "a")
    engine.submit(a_prompt, 1)
    await run(engine, clock)
    assert engine.scheduler.pool.cached_blocks == 2
    engine.submit(prompt(60, "b"), 4)
    await run(engine, clock)
    again = engine.submit(a_prompt, 1)
    await run(engine, clock)
    assert again.seq.cached_tokens == 0
    await engine.stop()


@pytest.mark.parametrize(
    ("cold_start_s", "at_s", "ready"),
    [
        pytest.param(5.0, 0.0, False, id="at-start"),
        pytest.param(5.0, 4.9, False, id="just-before"),
        pytest.param(5.0, 5.0, True, id="on-time"),
        pytest.param(0.0, 0.0, True, id="no-cold-start"),
    ],
)
async def test_cold_start_delays_readiness(
    clock: FakeClock, cold_start_s: float, at_s: float, ready: bool
) -> None:
    engine = await started(profile(cold_start_s=cold_start_s), clock)
    await clock.advance(at_s)
    assert engine.ready is ready
    assert engine.cold_start_left_s() == pytest.approx(max(0.0, cold_start_s - at_s))
    await engine.stop()


async def test_abort_frees_the_batch_slot_for_the_next_request(clock: FakeClock) -> None:
    engine = await started(profile(max_num_seqs=1), clock)
    a = engine.submit(prompt(10, "a"), 100)
    b = engine.submit(prompt(10, "b"), 2)
    await clock.advance(0.05)
    assert (engine.gauges().running, engine.gauges().waiting) == (1, 1)
    engine.abort(a)
    await run(engine, clock)
    assert a.seq.finish_reason == "abort"
    assert a.seq.generated < 100
    assert b.finished
    assert b.seq.finish_reason == "length"
    assert engine.stats.finished["abort"] == 1
    assert engine.gauges().kv_usage_frac == 0.0
    await engine.stop()


async def test_decode_steps_slow_down_as_the_batch_grows(clock: FakeClock) -> None:
    engine = await started(profile(max_num_seqs=4), clock)
    handles: list[SeqHandle] = [engine.submit(prompt(1, f"r{i}"), 11) for i in range(4)]
    await run(engine, clock)
    seq = handles[0].seq
    itl = ((seq.last_token_s or 0.0) - (seq.first_token_s or 0.0)) / 10
    assert itl == pytest.approx(step(4))
    await engine.stop()


async def test_instant_profile_finishes_on_submit(clock: FakeClock) -> None:
    engine = await started(PROFILES["instant"], clock)
    handle = engine.submit(prompt(10, "a"), 16)
    assert handle.finished
    assert handle.generated == 16
    assert clock.sleepers == 0
    assert engine.stats.generation_tokens == 16
    assert engine.stats.e2e.count == 1
    await engine.stop()


def test_a10g_profile_follows_its_roofline() -> None:
    a10g = PROFILES["a10g"]
    # 16.06 GB of weights read at 77% of 600 GB/s.
    assert a10g.decode_base_s == pytest.approx(16.06e9 / (600e9 * 0.77))
    assert a10g.kv_capacity_tokens % 16 == 0
    assert 20_000 < a10g.kv_capacity_tokens < 30_000
    h100 = PROFILES["h100"]
    assert h100.decode_base_s < a10g.decode_base_s / 5
    assert h100.max_num_seqs == 1024
