"""Where the loop's observations come from: the `Fleet` in this process, or a gateway over HTTP.

`FleetObserver` serves `fleetserve up`, where the autoscaler runs inside the gateway process
and reads the same `Fleet` the router reads. `GatewayObserver` serves `fleetserve autoscaler`,
a separate process that reads a gateway's `/admin/fleet` and `/admin/load`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from fleetserve.autoscale.observation import Observation
from fleetserve.autoscale.signals import observe
from fleetserve.errors import ConfigError, ObserveError
from fleetserve.fleet.fleet import Fleet
from fleetserve.routing.snapshot import EngineSignals, ReplicaSnapshot, ReplicaState


@dataclass(frozen=True, slots=True)
class GatewayFigures:
    """What the gateway measured for one model over its recent window."""

    held: int = 0
    ttft_p95_s: float | None = None
    arrival_rps: float | None = None
    arrival_tps: float | None = None


class FleetObserver:
    def __init__(
        self, fleet: Fleet, model: str, figures: Callable[[str, float], GatewayFigures]
    ) -> None:
        self.fleet = fleet
        self.model = model
        self.figures = figures

    async def observe(self, now: float, current: int) -> Observation:
        figures = self.figures(self.model, now)
        return observe(
            (r.snapshot() for r in self.fleet.replicas(self.model)),
            now=now,
            current=current,
            held=figures.held,
            ttft_p95_s=figures.ttft_p95_s,
            arrival_rps=figures.arrival_rps,
            arrival_tps=figures.arrival_tps,
        )


class GatewayObserver:
    """Reads one model's replicas and load from a fleetserve gateway's admin API."""

    def __init__(
        self, base_url: str, model: str, admin_key: str | None = None, timeout_s: float = 2.0
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"gateway URL must start with http:// or https://: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, path: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        url = f"{self.base_url}{path}"
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    text = (await response.text())[:200]
                    raise ObserveError(f"GET {url} answered {response.status}: {text}")
                return await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ObserveError(f"GET {url} failed: {exc!r}") from exc

    async def observe(self, now: float, current: int) -> Observation:
        fleet = await self._get("/admin/fleet")
        load = await self._get("/admin/load")
        snapshots = [
            _snapshot(r) for r in fleet.get("replicas", []) if r.get("model") == self.model
        ]
        figures = _figures(load, self.model)
        return observe(
            snapshots,
            now=now,
            current=current,
            held=figures.held,
            ttft_p95_s=figures.ttft_p95_s,
            arrival_rps=figures.arrival_rps,
            arrival_tps=figures.arrival_tps,
        )


def _snapshot(replica: dict[str, Any]) -> ReplicaSnapshot:
    try:
        state = ReplicaState(replica["state"])
        return ReplicaSnapshot(
            id=str(replica["id"]),
            url=str(replica.get("url", "")),
            model=str(replica["model"]),
            state=state,
            in_flight=int(replica.get("in_flight") or 0),
            signals=EngineSignals(
                running=replica.get("running"),
                waiting=replica.get("waiting"),
                kv_usage_frac=replica.get("kv_usage_frac"),
            ),
            last_seen=None,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ObserveError(f"unexpected replica in /admin/fleet: {replica!r}") from exc


def _figures(load: Any, model: str) -> GatewayFigures:
    models = load.get("models", load) if isinstance(load, dict) else {}
    entry = models.get(model) if isinstance(models, dict) else None
    if not isinstance(entry, dict):
        return GatewayFigures()
    return GatewayFigures(
        held=int(entry.get("held") or 0),
        ttft_p95_s=entry.get("ttft_p95_s"),
        arrival_rps=entry.get("arrival_rps"),
        arrival_tps=entry.get("demand_tps", entry.get("arrival_tps")),
    )
