"""The fleet timeline: while bench runs, sample the target's fleet state once a second.

`FleetSampler` is one asyncio task beside the load. Each tick it asks the target for its
state, turns the answer into a `FleetSample` (`bench.fleet_state` reads it) stamped with the
tick's offset from the run's start, and sleeps to the next tick on a fixed grid (a slow poll
skips the ticks it overran instead of piling up). Sources:

- `fleetserve`: a fleetserve gateway's `GET /admin/fleet`, with the admin key as a bearer
  token, plus `GET /admin/autoscaler` for the desired count (a 404 there means no autoscaler
  runs: desired stays None and it is not asked again);
- `prometheus`: any `/metrics` page (a fleetserve gateway's, one vLLM's, one llama.cpp's);
- `auto`: `/admin/fleet` if it answers as a fleetserve gateway does, else `/metrics` if it
  has gauges we know; decided at the first answer that tells, retried until then;
- `none`: no sampling.

A poll that fails (connect, timeout, an unexpected status, a body we cannot read) records
nothing: the timeline has a gap there, never a made-up 0. Failures are counted, and after
`failures_before_warning` in a row one warning is logged (once per outage). Every request has
its own timeout and the poll as a whole is bounded, so the task never stalls the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Literal

import aiohttp
import orjson

from fleetserve.bench.fleet_state import (
    FleetState,
    read_admin_autoscaler,
    read_admin_fleet,
    read_prometheus,
)
from fleetserve.bench.records import FleetSample
from fleetserve.clock import Clock

log = logging.getLogger("fleetserve.bench.timeline")

FleetSource = Literal["auto", "fleetserve", "prometheus", "none"]
FLEET_SOURCES: tuple[FleetSource, ...] = ("auto", "fleetserve", "prometheus", "none")
ADMIN_FLEET_PATH = "/admin/fleet"
ADMIN_AUTOSCALER_PATH = "/admin/autoscaler"
MAX_BODY_BYTES = 8 * 1024 * 1024  # a vLLM /metrics page is ~100 KiB


class PollError(Exception):
    """One poll got no usable answer."""


@dataclass(frozen=True, slots=True)
class SamplerSettings:
    source: FleetSource = "auto"
    interval_s: float = 1.0
    timeout_s: float = 2.0  # per HTTP request
    admin_key: str | None = None
    metrics_path: str = "/metrics"
    failures_before_warning: int = 5
    max_samples: int = 100_000  # a day at 1 s; sampling stops there

    def __post_init__(self) -> None:
        if self.source not in FLEET_SOURCES:
            raise ValueError(f"fleet source must be one of {', '.join(FLEET_SOURCES)}")
        if not (self.interval_s > 0 and self.timeout_s > 0):
            raise ValueError("interval_s and timeout_s must be positive")


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes


class FleetSampler:
    """Samples `base_url`'s fleet state every `settings.interval_s` until `stop()`.

    Times are `clock.now() - run_start_s` at each poll's start. Use as an async context
    manager, or call `start()` then `await stop()`, which returns the samples.
    """

    def __init__(
        self,
        base_url: str,
        clock: Clock,
        run_start_s: float,
        settings: SamplerSettings | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self.run_start_s = run_start_s
        self.settings = settings or SamplerSettings()
        self.samples: list[FleetSample] = []
        self.polls = 0  # polls finished, successful or not
        self.failures = 0  # polls that recorded nothing
        self.last_error: str | None = None
        # The source in use: the one asked for, or what `auto` found (None: not yet known).
        self.source: FleetSource | None = None if self.settings.source == "auto" else (
            self.settings.source)  # fmt: skip
        self._session = session
        self._own_session = session is None
        self._autoscaler: bool | None = None  # None: not asked yet; False: 404, none runs
        self._failed_in_a_row = 0
        self._warned = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FleetSampler:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def start(self) -> None:
        """Start sampling (from inside the running loop). A `none` source does nothing."""
        if self._task is not None or self.settings.source == "none":
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)
            )
        self._task = asyncio.create_task(self._run(), name="bench-fleet-sampler")

    async def stop(self) -> list[FleetSample]:
        """Stop sampling (a poll in progress is abandoned) and return the samples."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
        return list(self.samples)

    async def _run(self) -> None:
        settings, clock = self.settings, self.clock
        interval = settings.interval_s
        tick = max(clock.now(), self.run_start_s)
        # One poll makes at most two rounds of requests (auto: admin, then metrics).
        poll_bound_s = 2 * settings.timeout_s + 1.0
        while len(self.samples) < settings.max_samples:
            try:
                async with asyncio.timeout(poll_bound_s):
                    state = await self._poll()
            except (PollError, TimeoutError) as exc:
                self._failed(str(exc) or "timed out")
            else:
                self._record(tick, state)
            self.polls += 1
            now = clock.now()
            tick += interval
            if tick <= now:  # the poll overran: skip to the next tick still ahead
                tick += interval * (math.floor((now - tick) / interval) + 1)
            await clock.sleep(tick - now)
        log.warning("fleet timeline: stopped sampling after %d samples", settings.max_samples)

    def _record(self, tick: float, state: FleetState) -> None:
        self.samples.append(
            FleetSample(
                t_s=tick - self.run_start_s,
                replicas_ready=state.replicas_ready,
                replicas_desired=state.replicas_desired,
                replicas_starting=state.replicas_starting,
                replicas_draining=state.replicas_draining,
                in_flight=state.in_flight,
                queue_depth=state.queue_depth,
            )
        )
        if self._warned:
            log.info("fleet timeline: %s answers again", self.base_url)
        self._failed_in_a_row = 0
        self._warned = False

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self._failed_in_a_row += 1
        self.last_error = reason
        if self._failed_in_a_row >= self.settings.failures_before_warning and not self._warned:
            self._warned = True
            log.warning(
                "fleet timeline: %d polls of %s failed in a row (last: %s); the timeline has "
                "a gap until it answers", self._failed_in_a_row, self.base_url, reason,
            )  # fmt: skip

    # --- one poll -----------------------------------------------------------------------

    async def _poll(self) -> FleetState:
        if self.source == "fleetserve":
            return await self._poll_fleetserve(auto=False)
        if self.source == "prometheus":
            return await self._poll_prometheus()
        try:  # auto, undecided
            state = await self._poll_fleetserve(auto=True)
        except PollError as admin_error:
            try:
                state = await self._poll_prometheus()
            except PollError as metrics_error:
                raise PollError(
                    f"neither a fleetserve admin API ({admin_error}) nor Prometheus metrics "
                    f"({metrics_error})"
                ) from None
            self._decided("prometheus", self.settings.metrics_path)
            return state
        self._decided("fleetserve", ADMIN_FLEET_PATH)
        return state

    def _decided(self, source: FleetSource, path: str) -> None:
        self.source = source
        log.info("fleet timeline: sampling %s%s (%s)", self.base_url, path, source)

    async def _poll_fleetserve(self, *, auto: bool) -> FleetState:
        admin = self._admin_headers()
        fleet_get = self._get(ADMIN_FLEET_PATH, admin)
        if self._autoscaler is False:
            fleet_answer, desired = await fleet_get, None
        else:
            fleet_answer, desired = await asyncio.gather(fleet_get, self._desired(admin))
        if fleet_answer.status in (401, 403):
            hint = "no admin key given" if self.settings.admin_key is None else "wrong admin key"
            raise PollError(f"{ADMIN_FLEET_PATH} refused ({fleet_answer.status}, {hint})")
        fleet = _json_or_error(ADMIN_FLEET_PATH, fleet_answer)
        if auto and not (isinstance(fleet, dict) and ("by_state" in fleet or "replicas" in fleet)):
            raise PollError(f"{ADMIN_FLEET_PATH} is not a fleetserve fleet view")
        state = read_admin_fleet(fleet)
        if not state.known:
            raise PollError(f"{ADMIN_FLEET_PATH} has no fleet state in it")
        return _with_desired(state, desired)

    async def _desired(self, headers: dict[str, str]) -> int | None:
        """The autoscaler's desired count; None when unknown (absent, failed, unreadable)."""
        try:
            answer = await self._get(ADMIN_AUTOSCALER_PATH, headers)
        except PollError:
            return None
        if answer.status in (404, 405):
            self._autoscaler = False
            return None
        try:
            return read_admin_autoscaler(_json_or_error(ADMIN_AUTOSCALER_PATH, answer))
        except PollError:
            return None

    async def _poll_prometheus(self) -> FleetState:
        path = self.settings.metrics_path
        answer = await self._get(path, {})
        if answer.status != 200:
            raise PollError(f"{path} answered {answer.status}")
        try:
            state = read_prometheus(answer.body.decode("utf-8", errors="replace"))
        except ValueError as exc:
            raise PollError(f"{path} is not Prometheus text ({exc})") from None
        if not state.known:
            raise PollError(f"{path} has none of the fleet or engine gauges bench reads")
        return state

    def _admin_headers(self) -> dict[str, str]:
        key = self.settings.admin_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _get(self, path: str, headers: dict[str, str]) -> _Answer:
        session = self._session
        assert session is not None, "start() opens the session"
        try:
            async with session.get(self.base_url + path, headers=headers) as response:
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise PollError(f"{path} answered more than {MAX_BODY_BYTES} bytes")
                return _Answer(response.status, bytes(body))
        except TimeoutError:
            raise PollError(f"{path}: no answer within {self.settings.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise PollError(f"{path}: {type(exc).__name__}: {exc}") from None


def _json_or_error(path: str, answer: _Answer) -> object:
    if answer.status != 200:
        raise PollError(f"{path} answered {answer.status}")
    try:
        return orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise PollError(f"{path} did not answer JSON") from None


def _with_desired(state: FleetState, desired: int | None) -> FleetState:
    return state if desired is None else dataclasses.replace(state, replicas_desired=desired)
