"""What worker processes share (gateway/peers.py): merged load windows, reports, and the
replica set the workers of an autoscaled gateway follow."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from fleetserve.fleet.fleet import Fleet
from fleetserve.gateway.peers import (
    STALE_S,
    ReplicaEntry,
    RunDir,
    WorkerLink,
    follow_replica_set,
    merged_window,
    read_reports,
)
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.window import LoadWindow
from fleetserve.testing.clock import FakeClock


def feed(window: LoadWindow, events: list[tuple[float, str, float | None]]) -> None:
    """(time, model, ttft or None): an arrival, its first token, and it finishing."""
    for at, model, ttft in events:
        window.arrived(model, at, 100)
        if ttft is not None:
            window.observe_ttft(model, at + ttft, ttft)
        window.finished(model, at + 0.5)


EVENTS: list[tuple[float, str, float | None]] = [
    (100.0 + i * 0.37, "a" if i % 3 else "b", 0.05 * (i % 7) if i % 4 else None) for i in range(60)
]


def test_merged_windows_equal_one_window_that_saw_everything() -> None:
    whole, first, second = LoadWindow(), LoadWindow(), LoadWindow()
    feed(whole, EVENTS)
    feed(first, EVENTS[::2])
    feed(second, EVENTS[1::2])
    now = 125.0
    exported = orjson.loads(orjson.dumps(second.export(now), option=orjson.OPT_NON_STR_KEYS))
    merged = LoadWindow()
    merged.absorb(first.export(now), now)
    merged.absorb(exported, now)  # through JSON, as between processes
    for model in ("a", "b"):
        assert merged.snapshot(model, now) == whole.snapshot(model, now)


def test_an_older_export_does_not_overwrite_newer_buckets() -> None:
    """A report written a second ago still holds the bucket that left the window since; it
    shares a ring slot with the newest one and must not wipe it."""
    window_s = 5.0
    old, new = LoadWindow(window_s), LoadWindow(window_s)
    old.arrived("m", 100.2, 10)  # bucket 100: outside the window at 105.5
    new.arrived("m", 105.2, 10)  # bucket 105: the same ring slot (105 % 5 == 100 % 5)
    merged = LoadWindow(window_s)
    merged.absorb(new.export(105.5), 105.5)
    merged.absorb(old.export(104.9), 105.5)
    snap = merged.snapshot("m", 105.5)
    assert snap.arrival_rps * snap.window_s == pytest.approx(1.0)


def test_absorb_refuses_what_is_not_an_export() -> None:
    window = LoadWindow()
    with pytest.raises(ValueError, match="widths"):
        window.absorb({"window_s": 10.0, "bucket_s": 1.0, "models": {}}, 0.0)
    with pytest.raises(ValueError, match="not an exported"):
        window.absorb({"window_s": 30.0, "bucket_s": 1.0, "models": {"m": {"open": 1}}}, 0.0)


def test_reports_from_workers_that_stopped_writing_are_left_out(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.create()
    clock = FakeClock(start=50.0)
    fleet = Fleet()
    fleet.declare_model("m")
    window = LoadWindow()
    window.arrived("m", 50.0, 10)
    links = []
    for pid in (11, 12):
        link = WorkerLink(run, fleet, window, clock, lambda _m: 2, parent_pid=1)
        link.pid = pid
        link.report_now()
        links.append(link)
    (run.workers / "13.json").write_text("{not json")  # a writer that died mid-way
    assert [r.pid for r in read_reports(run, clock.now(), exclude_pid=11)] == [12]
    assert [r.held for r in read_reports(run, clock.now())] == [{"m": 2}, {"m": 2}]
    merged = merged_window(None, read_reports(run, clock.now()), clock.now(), 30.0)
    assert merged.snapshot("m", clock.now()).in_flight == 2  # one open request in each
    assert read_reports(run, clock.now() + STALE_S + 0.1) == []


@pytest.mark.parametrize(
    ("parent", "before", "after"),
    [
        pytest.param([("r1", "starting")], {}, {"r1": ReplicaState.STARTING}, id="added"),
        pytest.param(
            [("r1", "ready")], {"r1": ReplicaState.STARTING}, {"r1": ReplicaState.READY},
            id="parent-probed-it-ready",
        ),
        pytest.param(
            [("r1", "draining")], {"r1": ReplicaState.READY}, {"r1": ReplicaState.DRAINING},
            id="draining",
        ),
        pytest.param([], {"r1": ReplicaState.READY}, {}, id="removed"),
        pytest.param(
            [("r1", "starting")], {"r1": ReplicaState.UNHEALTHY}, {"r1": ReplicaState.UNHEALTHY},
            id="own-health-view-kept",
        ),
    ],
)  # fmt: skip
def test_workers_follow_the_parents_replica_set(
    parent: list[tuple[str, str]],
    before: dict[str, ReplicaState],
    after: dict[str, ReplicaState],
) -> None:
    fleet = Fleet()
    fleet.declare_model("m")
    follow_replica_set(
        fleet, "m", [ReplicaEntry(rid, f"http://{rid}", "starting", None) for rid in before], 0.0, 2
    )
    for rid, state in before.items():
        replica = fleet.get(rid)
        assert replica is not None
        replica.state = state
    entries = [ReplicaEntry(rid, f"http://{rid}", state, 32) for rid, state in parent]
    follow_replica_set(fleet, "m", entries, 1.0, 2)
    assert {r.id: r.state for r in fleet.replicas("m")} == after


def test_each_worker_takes_its_share_of_a_replicas_cap() -> None:
    fleet = Fleet()
    follow_replica_set(fleet, "m", [ReplicaEntry("r1", "http://r1", "ready", 32)], 0.0, 3)
    replica = fleet.get("r1")
    assert replica is not None
    assert replica.max_concurrency == 10  # 3 workers x 10 <= 32
    assert replica.state is ReplicaState.READY
