"""The release order of waiting requests: priority classes with a starvation guard, then the
Virtual Token Counter across tenants (Sheng et al., OSDI 2024), on scenario tables."""

from __future__ import annotations

from collections import Counter

import pytest

from fleetserve.tenancy.fairness import FairQueue, Priority


def saturate(
    queue: FairQueue[int],
    tenants: dict[str, float],
    *,
    releases: int,
    tokens: int = 100,
    backlog: int = 50,
) -> Counter[str]:
    """Every tenant keeps `backlog` requests of `tokens` input tokens waiting (all backlogged,
    as under saturation); returns the tokens served to each over `releases` releases."""
    ids = iter(range(10**9))
    owner: dict[int, str] = {}

    def top_up(now: float) -> None:
        for tenant, weight in tenants.items():
            while sum(1 for i in owner.values() if i == tenant) < backlog:
                item = next(ids)
                owner[item] = tenant
                queue.push(item, tenant, now=now, weight=weight, input_tokens=tokens)

    served: Counter[str] = Counter()
    for step in range(releases):
        top_up(float(step))
        item = queue.release(float(step))
        assert item is not None
        served[owner.pop(item)] += tokens
    return served


def shares(served: Counter[str]) -> dict[str, float]:
    total = sum(served.values())
    return {t: round(100 * n / total, 1) for t, n in served.items()}


@pytest.mark.parametrize(
    ("weights", "expected_pct"),
    [
        pytest.param({"a": 1, "b": 1}, {"a": 50, "b": 50}, id="equal"),
        pytest.param({"a": 1, "b": 3}, {"a": 25, "b": 75}, id="one-to-three"),
        pytest.param(
            {"a": 1, "b": 2, "c": 3, "d": 4}, {"a": 10, "b": 20, "c": 30, "d": 40},
            id="1-2-3-4",
        ),
    ],
)  # fmt: skip
def test_backlogged_tenants_share_by_weight(
    weights: dict[str, float], expected_pct: dict[str, float]
) -> None:
    got = shares(saturate(FairQueue(), weights, releases=1000))
    for tenant, pct in expected_pct.items():
        assert got[tenant] == pytest.approx(pct, abs=1.0)


def test_a_heavy_tenant_does_not_crowd_out_a_light_one() -> None:
    """a sends 10 requests for each of b's; both stay backlogged: service is 50/50, not the
    10:1 of arrival order."""
    queue: FairQueue[tuple[str, int]] = FairQueue()
    for i in range(100):
        queue.push(("a", i), "a", now=0.0, input_tokens=10)
        if i % 10 == 0:
            queue.push(("b", i), "b", now=0.0, input_tokens=10)
    first = [queue.release(1.0) for _ in range(20)]
    assert Counter(item[0] for item in first if item) == {"a": 10, "b": 10}


def test_output_tokens_count_as_they_stream() -> None:
    """Both stay backlogged: once a's answer streamed 500 tokens, b goes until it catches up."""
    queue: FairQueue[str] = FairQueue()
    for i in range(10):
        queue.push(f"a{i}", "a", now=0.0, input_tokens=10)
        queue.push(f"b{i}", "b", now=0.0, input_tokens=10)
    assert queue.release(0.0) == "a0"
    queue.charge("a", 500)  # a0's answer streams 500 tokens
    order = [queue.release(1.0) for _ in range(10)]
    assert order == [f"b{i}" for i in range(10)]  # b at 10..100, still below a's 510
    assert queue.counter("a") == 510
    assert queue.counter("b") == 100


def test_a_tenant_that_was_just_served_is_not_owed_anything() -> None:
    """VTC's lift also applies to a tenant whose queue merely ran empty: b2 arrives after b1
    went, so b starts level with a (510), not 500 tokens behind it."""
    queue: FairQueue[str] = FairQueue()
    queue.push("a1", "a", now=0.0, input_tokens=10)
    queue.push("b1", "b", now=0.0, input_tokens=10)
    assert queue.release(0.0) == "a1"
    queue.charge("a", 500)
    queue.push("a2", "a", now=1.0, input_tokens=10)
    assert queue.release(1.0) == "b1"
    queue.push("b2", "b", now=1.0, input_tokens=10)
    assert queue.counter("b") == 510
    assert queue.release(2.0) == "a2"  # a tie on counters: the older request goes first


def test_a_tenant_back_from_idle_is_lifted_to_the_current_minimum() -> None:
    """b was away while a was served 10,000 tokens: it gets the next turn, not the next 100."""
    queue: FairQueue[str] = FairQueue()
    for i in range(100):
        queue.push(f"a{i}", "a", now=0.0, input_tokens=100)
    for _ in range(100):
        queue.release(0.0)
        queue.push(f"a-more{_}", "a", now=0.0, input_tokens=100)
    for i in range(5):
        queue.push(f"b{i}", "b", now=1.0, input_tokens=100)
    order = [queue.release(2.0) for _ in range(6)]
    assert sum(1 for item in order if item and item.startswith("b")) == 3  # alternating now
    assert queue.counter("b") >= queue.counter("a") - 100


def test_priority_classes_go_first_but_batch_does_not_starve() -> None:
    queue: FairQueue[str] = FairQueue(starvation_s=10.0)
    queue.push("batch-0", "etl", now=0.0, priority=Priority.BATCH)
    for i in range(5):
        queue.push(f"chat-{i}", "app", now=1.0, priority=Priority.INTERACTIVE)
    queue.push("std-0", "web", now=1.0)
    assert [queue.release(2.0) for _ in range(3)] == ["chat-0", "chat-1", "chat-2"]
    assert queue.release(10.5) == "batch-0"  # waited 10.5 s >= 10: its turn
    assert queue.release(10.5) == "chat-3"
    assert [queue.release(11.0), queue.release(11.0)] == ["chat-4", "std-0"]
    assert queue.release(11.0) is None


def test_a_removed_request_is_never_released() -> None:
    queue: FairQueue[str] = FairQueue()
    for item in ("x", "y", "z"):
        queue.push(item, "t", now=0.0)
    assert queue.remove("y")
    assert not queue.remove("y")
    assert "y" not in queue
    assert [queue.release(0.0), queue.release(0.0), queue.release(0.0)] == ["x", "z", None]
    assert len(queue) == 0


def test_bad_arguments() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("x", "t", now=0.0)
    with pytest.raises(ValueError, match="already waiting"):
        queue.push("x", "t", now=0.0)
    with pytest.raises(ValueError, match="weight"):
        queue.push("y", "t", now=0.0, weight=0)
    with pytest.raises(ValueError, match="starvation_s"):
        FairQueue(starvation_s=0)


def test_no_credit_is_banked_across_spells_of_saturation() -> None:
    """The gateway's queue fills only while the fleet is saturated, and counters live as long
    as the process. a had an earlier spell (100,000 tokens); the queue then ran empty. b, new,
    is first to wait in the next spell, then a comes back: they alternate from the start, b is
    not owed a's whole past (before the lift into an empty class, b went 1,000 times in a row).
    """
    queue: FairQueue[str] = FairQueue()
    queue.push("a-old", "a", now=0.0, input_tokens=100)
    assert queue.release(0.0) == "a-old"
    queue.charge("a", 100_000)
    assert len(queue) == 0  # nobody waits: the spell is over
    for i in range(10):
        queue.push(f"b{i}", "b", now=100.0, input_tokens=100)
    for i in range(10):
        queue.push(f"a{i}", "a", now=100.5, input_tokens=100)
    order = [queue.release(101.0) for _ in range(10)]
    assert 4 <= sum(1 for item in order if item and item.startswith("a")) <= 6
    assert queue.counter("b") >= queue.counter("a") - 200


def test_a_lift_into_an_empty_class_keeps_a_higher_counter() -> None:
    """The lift only raises: a tenant that got more than everyone keeps its own counter."""
    queue: FairQueue[str] = FairQueue()
    queue.push("a0", "a", now=0.0, input_tokens=10)
    queue.push("b0", "b", now=0.0, input_tokens=10)
    assert [queue.release(0.0), queue.release(0.0)] == ["a0", "b0"]
    queue.charge("a", 1_000)  # a's answer is still streaming after the queue ran empty
    queue.push("a1", "a", now=1.0, input_tokens=10)
    assert queue.counter("a") == 1_010
    queue.push("b1", "b", now=1.0, input_tokens=10)
    assert queue.counter("b") == 1_010  # lifted to the least-served of those waiting: a
