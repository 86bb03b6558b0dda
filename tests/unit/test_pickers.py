"""Scenario tables and distribution properties for the replica pickers."""

from __future__ import annotations

import copy
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from fleetserve.config import PickerName
from fleetserve.routing.affinity import HashRing, key_hash
from fleetserve.routing.picker import Picker
from fleetserve.routing.pickers import (
    LeastOutstanding,
    PowerOfTwoChoices,
    PrefixAffinity,
    RoundRobin,
    make_picker,
)
from fleetserve.routing.snapshot import (
    NO_SIGNALS,
    EngineSignals,
    ReplicaSnapshot,
    ReplicaState,
    RouteRequest,
)

MODEL = "m"


def replica(
    rid: str,
    in_flight: int = 0,
    *,
    cap: int | None = None,
    running: float | None = None,
    waiting: float | None = None,
    kv: float | None = None,
) -> ReplicaSnapshot:
    signals = (
        NO_SIGNALS
        if running is None and waiting is None and kv is None
        else EngineSignals(running=running, waiting=waiting, kv_usage_frac=kv)
    )
    return ReplicaSnapshot(
        id=rid,
        url=f"http://{rid}:8000",
        model=MODEL,
        state=ReplicaState.READY,
        in_flight=in_flight,
        signals=signals,
        last_seen=None,
        max_concurrency=cap,
    )


def request(prefix_key: str = "", exclude: Sequence[str] = ()) -> RouteRequest:
    return RouteRequest(model=MODEL, prefix_key=prefix_key, exclude=frozenset(exclude))


def pick_id(picker: Picker, req: RouteRequest, replicas: Sequence[ReplicaSnapshot]) -> str:
    """The id a picker chooses, for cases where some replica must be chosen."""
    chosen = picker.pick(req, replicas)
    assert chosen is not None
    return chosen.id


def ids(n: int) -> list[str]:
    return [f"r{i}" for i in range(n)]


def new_p2c() -> PowerOfTwoChoices:
    return PowerOfTwoChoices(random.Random(7))


PICKERS: dict[str, Callable[[], Picker]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "p2c": new_p2c,
    "prefix_affinity": PrefixAffinity,
}


# -- the shared contract: exclude, capacity, nothing left --------------------------------


@dataclass
class ContractCase:
    replicas: list[ReplicaSnapshot]
    exclude: tuple[str, ...] = ()
    prefix_key: str = ""
    allowed: set[str] | None = field(default=None)  # None: the answer must be None


CONTRACT_CASES = [
    pytest.param(ContractCase([]), id="empty-list"),
    pytest.param(ContractCase([replica("a")], allowed={"a"}), id="single"),
    pytest.param(ContractCase([replica("a"), replica("b")], exclude=("a", "b")), id="all-excluded"),
    pytest.param(ContractCase([replica("a", 2, cap=2), replica("b", 5, cap=5)]), id="all-at-cap"),
    pytest.param(
        ContractCase([replica("a"), replica("b", 1), replica("c", 3)], ("a",), allowed={"b", "c"}),
        id="exclude-one",
    ),
    pytest.param(
        ContractCase([replica("a", 4, cap=4), replica("b", 9)], allowed={"b"}),
        id="cap-skips-idle-looking-full",
    ),
    pytest.param(
        ContractCase([replica("a", 1, cap=4), replica("b", 4, cap=4)], allowed={"a"}),
        id="cap-leaves-one",
    ),
    pytest.param(
        ContractCase([replica("a", 9, cap=9), replica("b"), replica("c")], ("b",), allowed={"c"}),
        id="exclude-and-cap",
    ),
    pytest.param(
        ContractCase(
            [replica("a", 9, cap=9), replica("b"), replica("c")], ("b", "c"), "sys-prompt"
        ),
        id="prefix-everything-gone",
    ),
]


@pytest.mark.parametrize("picker_name", list(PICKERS))
@pytest.mark.parametrize("case", CONTRACT_CASES)
def test_contract(picker_name: str, case: ContractCase) -> None:
    picker = PICKERS[picker_name]()
    for _ in range(6):  # repeated: rotation and sampling must not wander outside the set
        chosen = picker.pick(request(case.prefix_key, case.exclude), case.replicas)
        if case.allowed is None:
            assert chosen is None
        else:
            assert chosen is not None
            assert chosen.id in case.allowed


@pytest.mark.parametrize("picker_name", list(PICKERS))
def test_pick_does_not_mutate_inputs(picker_name: str) -> None:
    replicas = [replica("a", 1, cap=3, running=2, waiting=0, kv=0.5), replica("b", 2)]
    req = request("prefix", ("c",))
    before = (copy.deepcopy(replicas), copy.deepcopy(req))
    picker = PICKERS[picker_name]()
    for _ in range(5):
        picker.pick(req, replicas)
    assert (replicas, req) == before


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        pytest.param("round_robin", RoundRobin, id="round_robin"),
        pytest.param("least_outstanding", LeastOutstanding, id="least_outstanding"),
        pytest.param("p2c", PowerOfTwoChoices, id="p2c"),
        pytest.param("prefix_affinity", PrefixAffinity, id="prefix_affinity"),
    ],
)
def test_make_picker(name: PickerName, cls: type) -> None:
    picker = make_picker(name, load_factor=1.5, rng=random.Random(1))
    assert isinstance(picker, cls)
    assert picker.name == name


def test_make_picker_passes_load_factor() -> None:
    picker = make_picker("prefix_affinity", load_factor=2.0)
    assert isinstance(picker, PrefixAffinity)
    assert picker.load_factor == 2.0


# -- round robin --------------------------------------------------------------------------


def test_round_robin_spreads_exactly_evenly() -> None:
    picker = RoundRobin()
    replicas = [replica(rid) for rid in ids(5)]
    counts = Counter(pick_id(picker, request(), replicas) for _ in range(5 * 7))
    assert counts == dict.fromkeys(ids(5), 7)


def test_round_robin_order_independent_of_list_order() -> None:
    picker = RoundRobin()
    replicas = [replica(rid) for rid in ("c", "a", "b")]
    assert [pick_id(picker, request(), replicas) for _ in range(3)] == ["a", "b", "c"]
    shuffled = [replicas[2], replicas[0], replicas[1]]
    assert [pick_id(picker, request(), shuffled) for _ in range(3)] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("before", "picks_before", "after", "expected_next"),
    [
        pytest.param(["a", "b", "c", "d"], 2, ["a", "b", "bb", "c", "d"], ["bb", "c", "d", "a"],
                     id="join-takes-its-turn"),
        pytest.param(["a", "b", "c", "d"], 2, ["a", "b", "c", "d", "e"], ["c", "d", "e", "a"],
                     id="join-at-end"),
        pytest.param(["a", "b", "c", "d"], 2, ["a", "c", "d"], ["c", "d", "a"],
                     id="last-chosen-leaves"),
        pytest.param(["a", "b", "c", "d"], 2, ["a", "b", "d"], ["d", "a", "b"],
                     id="next-in-line-leaves"),
        pytest.param(["a", "b", "c", "d"], 4, ["b", "c"], ["b", "c"], id="wraps-after-leave"),
    ],
)  # fmt: skip
def test_round_robin_stable_when_replicas_change(
    before: list[str], picks_before: int, after: list[str], expected_next: list[str]
) -> None:
    picker = RoundRobin()
    old = [replica(rid) for rid in before]
    chosen = [pick_id(picker, request(), old) for _ in range(picks_before)]
    assert chosen == before[:picks_before]
    new = [replica(rid) for rid in after]
    assert [pick_id(picker, request(), new) for _ in expected_next] == expected_next


def test_round_robin_skips_excluded_without_losing_its_place() -> None:
    picker = RoundRobin()
    replicas = [replica(rid) for rid in ("a", "b", "c")]
    assert pick_id(picker, request(), replicas) == "a"
    assert pick_id(picker, request(exclude=("b",)), replicas) == "c"
    assert pick_id(picker, request(), replicas) == "a"


# -- least outstanding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loads", "exclude", "caps", "allowed"),
    [
        pytest.param([3, 1, 2], (), {}, {"r1"}, id="fewest-in-flight"),
        pytest.param([3, 1, 2], ("r1",), {}, {"r2"}, id="excluded-least-goes-to-next"),
        pytest.param([3, 1, 2], (), {"r1": 1}, {"r2"}, id="least-at-cap"),
        pytest.param([0, 5, 0, 5], (), {}, {"r0", "r2"}, id="tie-among-lightest"),
    ],
)
def test_least_outstanding_choices(
    loads: list[int], exclude: tuple[str, ...], caps: dict[str, int], allowed: set[str]
) -> None:
    replicas = [replica(f"r{i}", n, cap=caps.get(f"r{i}")) for i, n in enumerate(loads)]
    assert pick_id(LeastOutstanding(), request(exclude=exclude), replicas) in allowed


def test_least_outstanding_rotates_ties() -> None:
    picker = LeastOutstanding()
    replicas = [replica(rid, 2) for rid in ids(4)]
    counts = Counter(pick_id(picker, request(), replicas) for _ in range(40))
    assert counts == dict.fromkeys(ids(4), 10)


def test_least_outstanding_tied_subset_takes_turns() -> None:
    picker = LeastOutstanding()
    replicas = [replica("a", 1), replica("b", 4), replica("c", 1), replica("d", 4)]
    assert [pick_id(picker, request(), replicas) for _ in range(4)] == ["a", "c", "a", "c"]


def test_least_outstanding_ignores_engine_signals() -> None:
    replicas = [replica("busy-engine", 1, waiting=50), replica("idle-engine", 2, waiting=0)]
    assert pick_id(LeastOutstanding(), request(), replicas) == "busy-engine"


# -- power of two choices ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "lighter"),
    [
        pytest.param(replica("a", 1), replica("b", 3), "a", id="in-flight-only"),
        pytest.param(replica("a", 2, waiting=0), replica("b", 1, waiting=4), "a",
                     id="engine-queue-outweighs-one-in-flight"),
        pytest.param(replica("a", 2, running=10), replica("b", 2, running=2), "b",
                     id="running-counts"),
        pytest.param(replica("a", 1, kv=0.99), replica("b", 3, kv=0.5), "b",
                     id="kv-nearly-full-penalised"),
        pytest.param(replica("a", 1, kv=0.7), replica("b", 2, kv=0.1), "a",
                     id="kv-below-knee-ignored"),
        pytest.param(replica("a", 0), replica("b", 1, running=0, waiting=0), "a",
                     id="missing-signals-use-in-flight"),
    ],
)  # fmt: skip
def test_p2c_prefers_lower_score(a: ReplicaSnapshot, b: ReplicaSnapshot, lighter: str) -> None:
    picker = new_p2c()
    # With two candidates both are always sampled, so the lighter must win every time.
    assert {pick_id(picker, request(), [a, b]) for _ in range(20)} == {lighter}


def test_p2c_score_terms() -> None:
    picker = PowerOfTwoChoices(waiting_weight=1.0, running_weight=0.5, kv_weight=4.0)
    assert picker.load_score(replica("a", 3)) == 3.0
    assert picker.load_score(replica("a", 3, running=4, waiting=2, kv=0.9)) == pytest.approx(
        3 + 2 + 2 + 2
    )
    assert picker.load_score(replica("a", 0, kv=1.5)) == pytest.approx(4.0)  # clamped


def test_p2c_never_picks_the_heaviest_of_three() -> None:
    picker = new_p2c()
    replicas = [replica("light", 1), replica("medium", 2), replica("heavy", 30, waiting=10)]
    counts = Counter(pick_id(picker, request(), replicas) for _ in range(3000))
    assert counts["heavy"] == 0
    # light wins whenever sampled (2/3 of pairs); medium only when paired with heavy.
    assert 0.6 < counts["light"] / 3000 < 0.73


def test_p2c_samples_spread_when_equal() -> None:
    picker = new_p2c()
    replicas = [replica(rid) for rid in ids(4)]
    counts = Counter(pick_id(picker, request(), replicas) for _ in range(4000))
    assert set(counts) == set(ids(4))
    assert all(800 < c < 1200 for c in counts.values())


def test_p2c_spreads_over_eligible_when_some_are_not() -> None:
    picker = new_p2c()
    replicas = [replica("full", 4, cap=4), *(replica(rid) for rid in ids(3))]
    counts = Counter(pick_id(picker, request(exclude=("r0",)), replicas) for _ in range(3000))
    assert set(counts) == {"r1", "r2"}
    assert 1300 < counts["r1"] < 1700


def test_p2c_is_deterministic_for_a_seed() -> None:
    replicas = [replica(rid, i % 3) for i, rid in enumerate(ids(8))]
    runs = [
        [PowerOfTwoChoices(random.Random(42)).pick(request(), replicas) for _ in range(50)]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_p2c_rejects_bad_knee() -> None:
    with pytest.raises(ValueError, match="kv_knee_frac"):
        PowerOfTwoChoices(kv_knee_frac=1.0)


# -- prefix affinity ------------------------------------------------------------------------


def test_prefix_affinity_same_key_same_replica_while_balanced() -> None:
    picker = PrefixAffinity()
    ring = HashRing(ids(4))
    replicas = [replica(rid, 3) for rid in ids(4)]
    for key in (f"system-prompt-{k}" for k in range(50)):
        chosen = {pick_id(picker, request(key), replicas) for _ in range(5)}
        assert chosen == {ring.home(key_hash(key))}


def test_prefix_affinity_keys_spread_over_replicas() -> None:
    picker = PrefixAffinity()
    replicas = [replica(rid) for rid in ids(4)]
    counts = Counter(pick_id(picker, request(f"key-{k}"), replicas) for k in range(1000))
    assert set(counts) == set(ids(4))
    assert all(150 <= c <= 350 for c in counts.values()), counts


def test_prefix_affinity_adding_a_replica_moves_about_one_in_n() -> None:
    keys = [f"key-{k}" for k in range(1000)]
    four = [replica(rid) for rid in ids(4)]
    five = [replica(rid) for rid in ids(5)]
    picker = PrefixAffinity()
    before = {k: pick_id(picker, request(k), four) for k in keys}
    after = {k: pick_id(picker, request(k), five) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert len(moved) / len(keys) < 0.40
    # Consistent hashing: every key that moved, moved to the newcomer.
    assert {after[k] for k in moved} == {"r4"}


def test_prefix_affinity_spills_to_next_on_ring_and_returns_home() -> None:
    key = "hot-system-prompt"
    home, spill, *_ = HashRing(ids(4)).walk(key_hash(key))
    picker = PrefixAffinity(load_factor=1.25)

    def loads(hot: int) -> list[ReplicaSnapshot]:
        return [replica(rid, hot if rid == home else 2) for rid in ids(4)]

    # total 6+6=12 (+1) over 4 -> bound ceil(1.25*13/4)=5: home at 6 is over, spill.
    assert pick_id(picker, request(key), loads(6)) == spill
    # home at 4: total 10 (+1) -> bound ceil(1.25*11/4)=4; 4 is not < 4: still over.
    assert pick_id(picker, request(key), loads(4)) == spill
    # home at 3: total 9 (+1) -> bound 4; 3 + this request fits: back home.
    assert pick_id(picker, request(key), loads(3)) == home


@pytest.mark.parametrize(
    ("home_state", "expect"),
    [
        pytest.param("excluded", "spill", id="excluded-home-spills"),
        pytest.param("at-cap", "spill", id="full-home-spills"),
        pytest.param("ok", "home", id="home"),
    ],
)
def test_prefix_affinity_home_unavailable(home_state: str, expect: str) -> None:
    key = "tenant-a"
    home, spill, *_ = HashRing(ids(4)).walk(key_hash(key))
    replicas = [
        replica(rid, 1, cap=1 if (rid == home and home_state == "at-cap") else None)
        for rid in ids(4)
    ]
    exclude = (home,) if home_state == "excluded" else ()
    assert (
        pick_id(PrefixAffinity(), request(key, exclude), replicas)
        == {"home": home, "spill": spill}[expect]
    )


def test_prefix_affinity_falls_back_when_all_within_bound_are_gone() -> None:
    # r0, r1 at 1 are within the bound but excluded; r2 and r3 are over it.
    replicas = [replica("r0", 1), replica("r1", 1), replica("r2", 8), replica("r3", 6)]
    assert (
        pick_id(PrefixAffinity(), request("k", ("r0", "r1")), replicas) == "r3"
    )  # least outstanding of what is left


def test_prefix_affinity_empty_key_is_least_outstanding() -> None:
    picker = PrefixAffinity()
    replicas = [replica("a", 5), replica("b", 1), replica("c", 1)]
    assert [pick_id(picker, request(""), replicas) for _ in range(4)] == ["b", "c", "b", "c"]


def test_prefix_affinity_ring_rebuilt_only_when_id_set_changes() -> None:
    picker = PrefixAffinity()
    replicas = [replica(rid) for rid in ids(3)]
    picker.pick(request("k"), replicas)
    ring = picker._ring
    picker.pick(request("k"), [replica(rid, 4) for rid in ids(3)])  # new snapshots
    picker.pick(request("k"), list(reversed(replicas)))  # reordered
    assert picker._ring is ring
    picker.pick(request("k"), [*replicas, replica("r9")])
    assert picker._ring is not ring


def test_prefix_affinity_reorder_keeps_mapping() -> None:
    picker = PrefixAffinity()
    replicas = [replica(rid) for rid in ids(4)]
    keys = [f"k{i}" for i in range(100)]
    forward = [picker.pick(request(k), replicas) for k in keys]
    backward = [picker.pick(request(k), replicas[::-1]) for k in keys]
    assert forward == backward


def test_key_hash_is_stable_and_accepts_lone_surrogates() -> None:
    assert key_hash("system: you are helpful") == key_hash("system: you are helpful")
    assert key_hash("abc") == 891568578  # zlib.crc32(b"abc"): same in every process
    assert isinstance(key_hash("bad \ud800 text"), int)


def test_prefix_affinity_rejects_load_factor_below_one() -> None:
    with pytest.raises(ValueError, match="load_factor"):
        PrefixAffinity(load_factor=0.9)
