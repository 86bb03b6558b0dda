"""The live dashboard's data: one JSON snapshot of the fleet, pushed to open pages.

`Dashboard` is a background service of the gateway. Its sampler runs once a second whether
or not a page is open (it keeps the 15-minute replica history and the engines' token rates);
everything else is computed only while someone watches: the first authorised data request
turns the request trail on, and snapshots are built on demand, at most one per
`SNAPSHOT_REUSE_S` however many pages are open.

The stream (`events`) is Server-Sent Events: a `snapshot` event every `PUSH_S`, and a `bye`
event when the gateway begins shutting down, after which it ends, so that an open page never
holds a gateway's shutdown up.

With several gateway workers the page is served by one of them: replica states, in-flight
counts, held requests and request rates are the whole gateway's (the other workers' reports
are added, as /admin/fleet does); the request trail (last requests, TTFT p95, error rate) is
that worker's own, and the snapshot says so (`workers`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING

import orjson

from fleetserve.clock import Clock
from fleetserve.errors import ServiceUnavailableError
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.dashboard.history import FleetHistory, FleetSample, TokenRates
from fleetserve.gateway.dashboard.trail import RequestTrail, TrailFigures
from fleetserve.gateway.hold import HoldQueue
from fleetserve.gateway.peers import Peers, WorkerReport, merged_window
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.supervisor import Supervisor, cancel_all
from fleetserve.telemetry.window import LoadWindow

if TYPE_CHECKING:
    from fleetserve.gateway.tenancy_admin import TenancyApi

PUSH_S = 0.5  # a change reaches an open page within this plus a snapshot's build
SAMPLE_S = 1.0
SNAPSHOT_REUSE_S = 0.25
TENANT_USAGE_S = 5.0  # how often the ledger is asked for the tenants' usage
TENANT_USAGE_SINCE_S = 3600.0
REQUESTS_SHOWN = 50
DECISIONS_SHOWN = 12

AutoscalerView = Callable[[], object]


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


class Dashboard:
    def __init__(
        self,
        fleet: Fleet,
        clock: Clock,
        window: LoadWindow,
        holds: HoldQueue,
        trail: RequestTrail,
        supervisor: Supervisor,
        *,
        autoscaler: AutoscalerView | None = None,
        peers: Peers | None = None,
        tenancy: TenancyApi | None = None,
    ) -> None:
        self.fleet = fleet
        self.clock = clock
        self.window = window
        self.holds = holds
        self.trail = trail
        self.supervisor = supervisor
        self.autoscaler = autoscaler
        self.peers = peers
        self.tenancy = tenancy
        self.history = FleetHistory()
        self.rates = TokenRates()
        self.viewers = 0
        self.closing = False
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cached: tuple[float, bytes] | None = None
        self._tenants: dict[str, object] | None = None
        self._tenants_at: float | None = None
        fleet.subscribe(self._forget_when_removed)

    # -- the background service ------------------------------------------------------------
    async def start(self) -> None:
        self._task = self.supervisor.spawn("dashboard/sampler", self._sample_forever)

    async def stop(self) -> None:
        self.close()
        await cancel_all([self._task])
        self._task = None

    def close(self) -> None:
        """End every open stream (the gateway is shutting down): each sends `bye` and ends."""
        self.closing = True
        self._closed.set()

    async def _sample_forever(self) -> None:
        while True:
            self.sample()
            if self.trail.on and self.tenancy is not None:
                now = self.clock.now()
                if self._tenants_at is None or now - self._tenants_at >= TENANT_USAGE_S:
                    self._tenants_at = now
                    self._tenants = await self._tenant_usage()
            await self.clock.sleep(SAMPLE_S)

    def sample(self) -> None:
        """One history sample per model, and the engines' token counters."""
        now = self.clock.now()
        desired, scaled = _desired_of(self._autoscaler_view())
        for model in self.fleet.models():
            counts = self.fleet.count_by_state(model)
            sample = FleetSample(
                at=now,
                ready=counts[ReplicaState.READY],
                replicas=sum(counts.values()),
                desired=desired if model == scaled else None,
            )
            self.history.add(model, sample)
        for replica in self.fleet.replicas():
            self.rates.observe(replica.id, replica.signals.generation_tokens, replica.signals_at)

    def _forget_when_removed(self, replica: Replica) -> None:
        if self.fleet.get(replica.id) is None:
            self.rates.forget(replica.id)

    def _autoscaler_view(self) -> Mapping[str, object] | None:
        if self.autoscaler is None:
            return None
        view = self.autoscaler()
        return view if isinstance(view, Mapping) and view else None

    async def _tenant_usage(self) -> dict[str, object] | None:
        api = self.tenancy
        admin = None if api is None else api.admin
        if admin is None:
            return {"since_s": TENANT_USAGE_SINCE_S, "data": [], "error": "store not open yet"}
        try:
            data = await admin.usage(since_s=TENANT_USAGE_SINCE_S, by="tenant")
        except ServiceUnavailableError as exc:
            return {"since_s": TENANT_USAGE_SINCE_S, "data": [], "error": str(exc)}
        return {"since_s": TENANT_USAGE_SINCE_S, "data": data, "error": None}

    # -- what pages read ---------------------------------------------------------------------
    def watch(self) -> None:
        """An authorised data request: from now on requests are kept in the trail."""
        self.trail.start(self.clock.now())

    def snapshot_bytes(self) -> bytes:
        """The snapshot as JSON, reused for `SNAPSHOT_REUSE_S` (several pages, one build)."""
        now = self.clock.now()
        cached = self._cached
        if cached is not None and now - cached[0] < SNAPSHOT_REUSE_S:
            return cached[1]
        body = orjson.dumps(self.snapshot(now))
        self._cached = (now, body)
        return body

    def snapshot(self, now: float) -> dict[str, object]:
        reports = self.peers.reports() if self.peers is not None else []
        view = self._autoscaler_view()
        seen = self.trail.figures(now)
        return {
            "wall": round(self.clock.wall(), 3),
            "workers": 1 + len(reports),
            "shutting_down": self.closing,
            "replicas": self._replicas(now, reports, seen),
            "models": self._models(now, reports, view, seen),
            "history": self.history.view(now),
            "autoscaler": _decisions(view),
            "tenants": self._tenants_view(),
            "requests": [e.as_json(now) for e in self.trail.newest(REQUESTS_SHOWN)],
            "trail_for_s": None if self.trail.since is None else round(now - self.trail.since, 1),
            "trail_span_s": round(seen.span_s, 1),
        }

    def _tenants_view(self) -> dict[str, object] | None:
        if self.tenancy is None:
            return None
        if self._tenants is None:  # the first read of the ledger is under way
            return {"since_s": TENANT_USAGE_SINCE_S, "data": [], "error": None}
        return self._tenants

    def _replicas(
        self, now: float, reports: list[WorkerReport], seen: TrailFigures
    ) -> list[dict[str, object]]:
        others: dict[str, int] = {}
        for report in reports:
            for rid, n in report.in_flight.items():
                others[rid] = others.get(rid, 0) + n
        rows: list[dict[str, object]] = []
        for r in self.fleet.replicas():
            served = seen.replica(r.id)
            signals = r.signals
            rows.append({
                "id": r.id, "name": r.name, "model": r.model, "url": r.url,
                "state": r.state.value, "reason": r.reason,
                "state_for_s": round(now - r.state_since, 1),
                "in_flight": r.in_flight + others.get(r.id, 0),
                "running": signals.running, "waiting": signals.waiting,
                "kv_usage_frac": _round(signals.kv_usage_frac),
                "ttft_p95_s": _round(served["ttft_p95_s"]),
                "tokens_per_s": _round(self.rates.rate(r.id), 1),
                "scrape_age_s": None if r.signals_at is None else round(now - r.signals_at, 2),
            })  # fmt: skip
        return rows

    def _models(
        self,
        now: float,
        reports: list[WorkerReport],
        view: Mapping[str, object] | None,
        seen: TrailFigures,
    ) -> list[dict[str, object]]:
        window = self.window
        if reports:
            window = merged_window(window, reports, now, window.window_s)
        desired, scaled = _desired_of(view)
        rows: list[dict[str, object]] = []
        for model in self.fleet.models():
            load = window.snapshot(model, now)
            served = seen.model(model)
            counts = self.fleet.count_by_state(model)
            held = self.holds.held(model) + sum(r.held.get(model, 0) for r in reports)
            rows.append({
                "name": model,
                "ready": counts[ReplicaState.READY], "replicas": sum(counts.values()),
                "desired": desired if model == scaled else None,
                "arrival_rps": round(load.arrival_rps, 3),
                "in_flight": load.in_flight,
                "held": held, "max_held": self.holds.settings.max_held,
                "can_hold": self.holds.can_hold(model),
                "ttft_p95_s": _round(served["ttft_p95_s"]),
                "window_ttft_p95_s": _round(load.ttft_p95_s),
                "error_rate": _round(served["error_rate"]),
                "completed_rps": _round(served["completed_rps"], 3),
            })  # fmt: skip
        return rows

    # -- the stream --------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[bytes]:
        """SSE: a snapshot every PUSH_S until the gateway shuts down (then `bye`)."""
        self.viewers += 1
        try:
            yield b"retry: 1000\n\n"
            while not self.closing:
                yield b"event: snapshot\ndata: " + self.snapshot_bytes() + b"\n\n"
                await self._pause(PUSH_S)
            yield b'event: bye\ndata: {"reason": "the gateway is shutting down"}\n\n'
        finally:
            self.viewers -= 1

    async def _pause(self, seconds: float) -> None:
        """Sleep on the clock, or less when `close()` is called."""
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((sleeper, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (sleeper, closed):
                pending.cancel()


def _desired_of(view: Mapping[str, object] | None) -> tuple[int | None, str | None]:
    """(desired replicas, of which model) from the autoscaler's view; (None, None) without."""
    if view is None:
        return None, None
    desired, model = view.get("desired"), view.get("model")
    return (desired if isinstance(desired, int) else None), (
        model if isinstance(model, str) else None
    )


def _decisions(view: Mapping[str, object] | None) -> dict[str, object] | None:
    """The autoscaler's model, desired count and latest decisions and scaling events."""
    if view is None:
        return None
    recent = view.get("recent")
    changes = view.get("changes")
    return {
        "model": view.get("model"),
        "desired": view.get("desired"),
        "latest": view.get("latest"),
        "recent": _last(recent, DECISIONS_SHOWN),
        "changes": _last(changes, DECISIONS_SHOWN),
    }


def _last(entries: object, count: int) -> list[object]:
    """The newest `count` of a list, newest first (anything else: none)."""
    if not isinstance(entries, list):
        return []
    return list(reversed(entries[-count:]))
