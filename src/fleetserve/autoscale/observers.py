"""Where the loop's observations come from: the `Fleet` in this process, or a gateway over HTTP.

`FleetObserver` serves `fleetserve up`, where the autoscaler runs inside the gateway process
and reads the same `Fleet` the router reads. `GatewayObserver` serves `fleetserve autoscaler`,
a separate process that reads a gateway's `/admin/fleet` and `/admin/load`. An answer that
is not JSON, or not of the shape those routes answer, is an `ObserveError` (the step is
skipped), as an unreachable gateway is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
        snapshots = (r.snapshot() for r in self.fleet.replicas(self.model))
        return _observation(snapshots, self.figures(self.model, now), now, current)


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

    async def _get(self, path: str) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        url = f"{self.base_url}{path}"
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    text = (await response.text())[:200]
                    raise ObserveError(f"GET {url} answered {response.status}: {text}")
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ObserveError(f"GET {url} failed: {exc!r}") from exc
        except ValueError as exc:  # json.JSONDecodeError, or text that is not UTF-8
            raise ObserveError(f"GET {url} answered a body that is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ObserveError(f"GET {url} answered {type(body).__name__}, not an object")
        return body

    async def observe(self, now: float, current: int) -> Observation:
        fleet = await self._get("/admin/fleet")
        load = await self._get("/admin/load")
        replicas = fleet.get("replicas", [])
        if not isinstance(replicas, list):
            raise ObserveError(f"unexpected replicas in /admin/fleet: {replicas!r:.200}")
        snapshots = [
            _snapshot(r)
            for r in replicas
            if not isinstance(r, dict) or r.get("model") == self.model
        ]
        return _observation(snapshots, _figures(load, self.model), now, current)


def _observation(
    snapshots: Iterable[ReplicaSnapshot], figures: GatewayFigures, now: float, current: int
) -> Observation:
    return observe(
        snapshots,
        now=now,
        current=current,
        held=figures.held,
        ttft_p95_s=figures.ttft_p95_s,
        arrival_rps=figures.arrival_rps,
        arrival_tps=figures.arrival_tps,
    )


def _snapshot(replica: object) -> ReplicaSnapshot:
    if not isinstance(replica, dict):
        raise ObserveError(f"unexpected replica in /admin/fleet: {replica!r:.200}")
    try:
        state = ReplicaState(replica["state"])
        return ReplicaSnapshot(
            id=str(replica["id"]),
            url=str(replica.get("url", "")),
            model=str(replica["model"]),
            state=state,
            in_flight=int(_number(replica.get("in_flight")) or 0),
            signals=EngineSignals(
                running=_number(replica.get("running")),
                waiting=_number(replica.get("waiting")),
                kv_usage_frac=_number(replica.get("kv_usage_frac")),
            ),
            last_seen=None,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ObserveError(f"unexpected replica in /admin/fleet: {replica!r:.200}") from exc


def _figures(load: dict[str, Any], model: str) -> GatewayFigures:
    models = load.get("models", load)
    entry = models.get(model) if isinstance(models, dict) else None
    if not isinstance(entry, dict):
        return GatewayFigures()
    try:
        return GatewayFigures(
            held=int(_number(entry.get("held")) or 0),
            ttft_p95_s=_number(entry.get("ttft_p95_s")),
            arrival_rps=_number(entry.get("arrival_rps")),
            arrival_tps=_number(entry.get("demand_tps", entry.get("arrival_tps"))),
        )
    except TypeError as exc:
        raise ObserveError(f"unexpected load of {model} in /admin/load: {entry!r:.200}") from exc


def _number(value: object) -> float | None:
    """A JSON number or null as the policy takes it; TypeError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return value
