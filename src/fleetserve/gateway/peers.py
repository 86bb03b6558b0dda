"""What a gateway's worker processes share through their run directory.

With `--workers N` each worker serves its own connections with its own Fleet view and load
window. So that the admin views answer for the whole gateway, whichever worker takes the
call, every worker writes a report to `RUN/workers/PID.json` every `REPORT_S`: its load
window (`LoadWindow.export`), its in-flight count per replica and what it holds. An admin
view merges the fresh reports of the other workers into its own live state. A drain asked of
one worker goes into `RUN/drained`, which every worker applies.

An autoscaled `up` with N workers runs its actuator and autoscaler in the parent process
(gateway/workers.py): the parent writes the replica set to `RUN/replicas.json`, which the
workers follow as their discovery, and its autoscaler view to `RUN/autoscaler.json`; it reads
the workers' reports as its observation. A worker that starts holding requests writes its
report at once and wakes the parent with SIGUSR1.

Files are written whole and renamed into place, so a reader never sees half of one. The cost
is one small JSON write per worker per `REPORT_S` (benchmarks/workers_overhead.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from fleetserve.clock import Clock
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.supervisor import Supervisor, cancel_all
from fleetserve.telemetry.window import LoadWindow

log = logging.getLogger("fleetserve.gateway")

REPORT_S = 0.25
STALE_S = 3.0  # a report older than this is from a worker that died or hangs: left out
WAKE_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True)
class RunDir:
    """The directory one gateway's processes share (made by gateway/workers.py)."""

    path: Path

    @property
    def workers(self) -> Path:
        return self.path / "workers"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"  # prometheus_client's multiprocess files

    @property
    def drained(self) -> Path:
        return self.path / "drained"

    @property
    def replicas(self) -> Path:
        return self.path / "replicas.json"

    @property
    def autoscaler(self) -> Path:
        return self.path / "autoscaler.json"

    def create(self) -> None:
        for directory in (self.path, self.workers, self.metrics):
            directory.mkdir(parents=True, exist_ok=True)

    def report_of(self, pid: int) -> Path:
        return self.workers / f"{pid}.json"


@dataclass(frozen=True)
class WorkerContext:
    """What makes a gateway one of several worker processes (gateway/workers.py)."""

    run: RunDir
    parent_pid: int
    index: int
    workers: int
    follow: bool = False  # the parent's actuator owns the replicas: follow its replica set


def write_json(path: Path, data: object) -> None:
    """Write whole and rename into place: readers see the old file or the new one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS))
    partial.replace(path)


def read_json(path: Path) -> object | None:
    """The file's JSON, or None when it is missing or not JSON (a writer that died)."""
    try:
        data: object = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data


@dataclass(frozen=True)
class WorkerReport:
    """What one worker told the others, `at` seconds on the shared monotonic clock."""

    pid: int
    at: float
    window: dict[str, object]
    in_flight: dict[str, int]  # by replica id
    held: dict[str, int]  # by model

    @classmethod
    def parse(cls, data: object) -> WorkerReport | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                pid=int(data["pid"]),
                at=float(data["at"]),
                window=dict(data["window"]),
                in_flight={str(k): int(v) for k, v in data["in_flight"].items()},
                held={str(k): int(v) for k, v in data["held"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def read_reports(run: RunDir, now: float, exclude_pid: int | None = None) -> list[WorkerReport]:
    """The fresh reports of the workers (not `exclude_pid`'s)."""
    reports = []
    for path in sorted(run.workers.glob("*.json")):
        report = WorkerReport.parse(read_json(path))
        if report is None or report.pid == exclude_pid or now - report.at > STALE_S:
            continue
        reports.append(report)
    return reports


def merged_window(own: LoadWindow | None, reports: list[WorkerReport], now: float,
                  window_s: float) -> LoadWindow:  # fmt: skip
    """One load window summing `own` (live) and the reports' windows."""
    merged = LoadWindow(window_s)
    if own is not None:
        merged.absorb(own.export(now), now)
    for report in reports:
        try:
            merged.absorb(report.window, now)
        except ValueError as exc:
            log.warning("worker %d's load report is unreadable: %s", report.pid, exc)
    return merged


@dataclass
class Peers:
    """A worker's view of the other workers (admin views read it)."""

    run: RunDir
    clock: Clock
    pid: int = field(default_factory=os.getpid)

    def reports(self) -> list[WorkerReport]:
        return read_reports(self.run, self.clock.now(), exclude_pid=self.pid)

    def drain(self, replica_id: str) -> None:
        """Tell every worker to drain `replica_id` (appended: each applies what is new)."""
        with self.run.drained.open("a") as drained:
            drained.write(replica_id + "\n")


@dataclass(frozen=True)
class ReplicaEntry:
    """One replica as the parent's actuator knows it, for the workers to follow."""

    id: str
    url: str
    state: str
    max_concurrency: int | None


def write_replica_set(run: RunDir, fleet: Fleet, model: str) -> None:
    entries = [
        {"id": r.id, "url": r.url, "state": r.state.value, "max_concurrency": r.max_concurrency}
        for r in fleet.replicas(model)
    ]
    write_json(run.replicas, {"model": model, "replicas": entries})


def read_replica_set(run: RunDir) -> tuple[str, list[ReplicaEntry]] | None:
    data = read_json(run.replicas)
    if not isinstance(data, dict):
        return None
    try:
        entries = [
            ReplicaEntry(str(e["id"]), str(e["url"]), str(e["state"]), e.get("max_concurrency"))
            for e in data["replicas"]
        ]
        return str(data["model"]), entries
    except (KeyError, TypeError):
        return None


class WorkerLink:
    """A worker's side of the sharing: a background service of its app.

    Every `REPORT_S` it writes this worker's report, applies drains others asked for, and,
    when `follow` is set, makes the Fleet match the parent's replica set. It notices a parent
    that died (the worker then shuts down rather than serve on as an orphan).
    """

    def __init__(
        self,
        run: RunDir,
        fleet: Fleet,
        window: LoadWindow,
        clock: Clock,
        held: Callable[[str], int],
        *,
        parent_pid: int,
        follow: bool = False,
        workers: int = 1,
        on_orphaned: Callable[[], None] | None = None,
        on_parent_view: Callable[[dict[str, object]], None] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.run = run
        self.fleet = fleet
        self.window = window
        self.clock = clock
        self.held = held
        self.parent_pid = parent_pid
        self.follow = follow
        self.workers = workers
        self.on_orphaned = on_orphaned
        self.on_parent_view = on_parent_view
        self.supervisor = supervisor or Supervisor(clock)
        self.parent_view: dict[str, object] | None = None  # the parent's autoscaler view
        self.pid = os.getpid()
        self._drained_seen = 0
        self._replicas_stamp: int | None = None
        self._view_stamp: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.step()
        self._task = self.supervisor.spawn("gateway/worker-link", self._run)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_all([task])
        self.close()

    async def _run(self) -> None:
        while True:
            await self.clock.sleep(REPORT_S)
            self.step()

    def report_now(self) -> None:
        now = self.clock.now()
        write_json(
            self.run.report_of(self.pid),
            {
                "pid": self.pid,
                "at": now,
                "window": self.window.export(now),
                "in_flight": {r.id: r.in_flight for r in self.fleet.replicas() if r.in_flight},
                "held": {m: n for m in self.fleet.models() if (n := self.held(m))},
            },
        )

    def wake_parent(self, _model: str) -> None:
        """The hold queue's demand hook: report the held request, then wake the parent."""
        self.report_now()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.parent_pid, WAKE_SIGNAL)

    def step(self) -> None:
        """One round: report, apply drains, follow the replica set, check the parent."""
        self.report_now()
        self._apply_drains()
        if self.follow:
            self._follow()
            self._read_parent_view()
        if os.getppid() != self.parent_pid and self.on_orphaned is not None:
            log.warning("the gateway's parent process %d is gone: shutting down", self.parent_pid)
            callback, self.on_orphaned = self.on_orphaned, None
            callback()

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.run.report_of(self.pid).unlink()

    def _apply_drains(self) -> None:
        try:
            text = self.run.drained.read_text()
        except FileNotFoundError:
            return
        lines = text.splitlines()
        now = self.clock.now()
        for replica_id in lines[self._drained_seen :]:
            self.fleet.drain(replica_id, now)
        self._drained_seen = len(lines)

    def _read_parent_view(self) -> None:
        try:
            stamp = self.run.autoscaler.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if stamp == self._view_stamp:
            return
        view = read_json(self.run.autoscaler)
        if isinstance(view, dict):
            self._view_stamp = stamp
            self.parent_view = view
            if self.on_parent_view is not None:
                self.on_parent_view(view)

    def _follow(self) -> None:
        try:
            stamp = self.run.replicas.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if stamp == self._replicas_stamp:
            return
        read = read_replica_set(self.run)
        if read is None:
            return
        self._replicas_stamp = stamp
        model, entries = read
        follow_replica_set(self.fleet, model, entries, self.clock.now(), self.workers)


def follow_replica_set(
    fleet: Fleet, model: str, entries: list[ReplicaEntry], now: float, workers: int
) -> None:
    """Make `fleet`'s replicas of `model` match the parent's: add, mark ready (the parent
    probed it), drain, remove. Each of the `workers` gets an equal share of a replica's
    `max_concurrency`, so together they never put more in flight than the cap."""
    wanted = {e.id: e for e in entries}
    for replica in fleet.replicas(model):
        if replica.id not in wanted:
            fleet.remove(replica.id)
    for entry in entries:
        known = fleet.get(entry.id)
        if known is None:
            cap = entry.max_concurrency
            share = None if cap is None else max(1, cap // workers)
            known = Replica(
                id=entry.id, url=entry.url, model=model, max_concurrency=share, state_since=now
            )
            fleet.add(known)
        replica = known
        if entry.state == ReplicaState.READY.value and replica.state is ReplicaState.STARTING:
            fleet.probe_passed(entry.id, now)
        elif entry.state == ReplicaState.DRAINING.value:
            fleet.drain(entry.id, now)


class ParentLink:
    """The parent's side of an autoscaled gateway with several workers: a background service
    of the parent (gateway/workers.py).

    It publishes the parent's replica set on every change (the workers follow it), reads the
    workers' reports every `REPORT_S` into the parent's Fleet (in-flight per replica, which
    drains wait on) and answers `figures` from their merged load windows (what the autoscaler
    observes), and writes the autoscaler's view for the workers to serve.
    """

    def __init__(
        self,
        run: RunDir,
        fleet: Fleet,
        model: str,
        clock: Clock,
        window_s: float,
        view: Callable[[], dict[str, object]],
        supervisor: Supervisor | None = None,
    ) -> None:
        self.run = run
        self.fleet = fleet
        self.model = model
        self.clock = clock
        self.window_s = window_s
        self.view = view
        self.supervisor = supervisor or Supervisor(clock)
        self._task: asyncio.Task[None] | None = None
        fleet.declare_model(model)
        fleet.subscribe(lambda _replica: self.publish())

    def publish(self) -> None:
        write_replica_set(self.run, self.fleet, self.model)

    def load(self, now: float) -> LoadWindow:
        """The workers' load windows merged (held requests included)."""
        return merged_window(None, read_reports(self.run, now), now, self.window_s)

    def step(self) -> None:
        now = self.clock.now()
        reports = read_reports(self.run, now)
        for replica in self.fleet.replicas(self.model):
            replica.in_flight = sum(r.in_flight.get(replica.id, 0) for r in reports)
        write_json(self.run.autoscaler, self.view())

    async def start(self) -> None:
        self.publish()
        self.step()
        self._task = self.supervisor.spawn("gateway/parent-link", self._run)

    async def _run(self) -> None:
        while True:
            await self.clock.sleep(REPORT_S)
            self.step()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_all([task])
