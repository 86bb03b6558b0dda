"""Active health probes and engine-metrics scrapes: the I/O that keeps the Fleet current.

Probes run every `interval_s`; an ejected replica is probed only when its ejection time has
passed (the half-open probe). Scrapes read each ready replica's /metrics into engine signals;
a failed scrape does not eject (the probe decides health) but stale signals are dropped so
pickers fall back to the gateway's own in-flight counts.

Each round reads the live Fleet, so replicas that actuators or discovery add at run time are
probed and scraped from the next round on, and removed ones are not probed again. Starting
replicas are also probed every `STARTING_PROBE_S`: a replica started to serve held requests
is routed to within that long of its engine becoming healthy, not a whole probe period.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from fleetserve.clock import Clock
from fleetserve.config import HealthSettings
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.routing.snapshot import EngineSignals, ReplicaState
from fleetserve.supervisor import Supervisor, cancel_all

log = logging.getLogger("fleetserve.gateway.monitor")

SignalParser = Callable[[str], EngineSignals]
STALE_AFTER_SCRAPES = 3
STARTING_PROBE_S = 0.25
# Every engine adapter serves these (vLLM, llama.cpp and the sim engine alike).
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"


class FleetMonitor:
    def __init__(
        self,
        fleet: Fleet,
        settings: HealthSettings,
        clock: Clock,
        parsers: dict[str, SignalParser],
        supervisor: Supervisor | None = None,
    ) -> None:
        self.fleet = fleet
        self.settings = settings
        self.clock = clock
        self.parsers = parsers
        self.supervisor = supervisor or Supervisor(clock)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.probe_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        await self.probe_all()  # static replicas become ready before the first request
        rounds = [
            ("monitor/probe", self.probe_all, self.settings.interval_s),
            ("monitor/scrape", self.scrape_all, self.settings.scrape_interval_s),
            ("monitor/probe-starting", self.probe_starting,
             min(STARTING_PROBE_S, self.settings.interval_s)),
        ]  # fmt: skip
        self._tasks = [
            self.supervisor.spawn(name, functools.partial(self._loop, step, period_s))
            for name, step, period_s in rounds
        ]

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _loop(self, step: Callable[[], Awaitable[None]], period_s: float) -> None:
        while True:
            await self.clock.sleep(period_s)
            await step()

    async def probe_all(self) -> None:
        now = self.clock.now()
        due = [
            r
            for r in self.fleet.replicas()
            if r.state is not ReplicaState.DRAINING and r.probe_due(now)
        ]
        await asyncio.gather(*(self._probe(r) for r in due))

    async def probe_starting(self) -> None:
        starting = [r for r in self.fleet.replicas() if r.state is ReplicaState.STARTING]
        await asyncio.gather(*(self._probe(r) for r in starting))

    async def _probe(self, replica: Replica) -> None:
        assert self._session is not None
        try:
            async with self._session.get(replica.url + HEALTH_PATH) as response:
                ok = response.status == 200
                reason = f"status {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        now = self.clock.now()
        if ok:
            self.fleet.probe_passed(replica.id, now)
        else:
            self.fleet.probe_failed(replica.id, now, reason)

    async def scrape_all(self) -> None:
        ready = [r for r in self.fleet.replicas() if r.state is ReplicaState.READY]
        await asyncio.gather(*(self._scrape(r) for r in ready))

    async def _scrape(self, replica: Replica) -> None:
        assert self._session is not None
        parser = self.parsers.get(replica.model)
        if parser is None:
            return
        now = self.clock.now()
        try:
            async with self._session.get(replica.url + METRICS_PATH) as response:
                if response.status != 200:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status
                    )
                text = await response.text()
            signals = parser(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("scrape of %s failed: %s", replica.id, exc)
            stale_s = self.settings.scrape_interval_s * STALE_AFTER_SCRAPES
            if replica.signals_at is not None and now - replica.signals_at > stale_s:
                self.fleet.clear_signals(replica.id)
            return
        self.fleet.set_signals(replica.id, signals, now)
