"""KubernetesDiscovery: keep a model's replicas in the Fleet in step with a Service's
EndpointSlices (list, then watch), with lightkube.

As client-go's reflector does: LIST the slices (label `kubernetes.io/service-name=<service>`)
and take the list's resourceVersion, then WATCH from it; a watch the server ends cleanly
(its `timeoutSeconds` passed) is resumed from the last event's version by lightkube. When
the version has expired (410 Gone) the slices are listed afresh at once; when the API
fails or cannot be reached, after a bounded, jittered backoff. Meanwhile the Fleet keeps its
last view (the gateway's health probes still eject replicas that die), and one warning is
logged per outage, one line when it ends.

The decisions (what a slice says, what to add, drain, remove) are pure, in
`endpoint_slices`; this module does the I/O and applies them.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.config.kubeconfig import SingleConfig
from lightkube.core.exceptions import NotReadyError
from lightkube.resources.discovery_v1 import EndpointSlice

from fleetserve.clock import Clock
from fleetserve.config import KubernetesDiscoverySpec, ModelSpec
from fleetserve.errors import DiscoveryError
from fleetserve.fleet.discovery import replica_id
from fleetserve.fleet.endpoint_slices import (
    SERVICE_NAME_LABEL,
    Held,
    SliceEndpoints,
    merge,
    plan,
    slice_endpoints,
)
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.kubernetes import DEFAULT_TIMEOUT_S, load_kubeconfig
from fleetserve.fleet.replica import Replica
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.supervisor import Backoff, Supervisor, cancel_all

log = logging.getLogger("fleetserve.fleet.kubernetes_discovery")

# client-go's reflector asks the server to end each watch after 5-10 min (jittered), so a
# connection that silently died is replaced within that long.
WATCH_TIMEOUT_S = 300
WATCH_SLACK_S = 30.0


class KubernetesDiscovery:
    """A background service (start/stop) for one model; it writes only replicas it added."""

    def __init__(
        self,
        config: SingleConfig,
        fleet: Fleet,
        model: ModelSpec,
        spec: KubernetesDiscoverySpec,
        clock: Clock,
        *,
        backoff: Backoff | None = None,
        jitter: Callable[[], float] = random.random,
        tick_s: float = 1.0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.model = model
        self.spec = spec
        self.clock = clock
        self.backoff = backoff or Backoff()
        self.jitter = jitter
        self.tick_s = tick_s
        self.timeout_s = timeout_s
        self.supervisor = supervisor or Supervisor(clock)
        self.namespace: str = spec.namespace or config.namespace
        self._client: AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._slices: dict[str, SliceEndpoints] = {}
        self._ids: dict[str, str] = {}  # URL -> replica id, for the replicas this added
        self._gone_since: dict[str, float] = {}
        self._problems: dict[str, str] = {}  # slice name -> the problem last logged
        self._outage: str | None = None
        self._idle_watch = True  # the current watch has delivered no event yet

    @classmethod
    def connect(
        cls,
        fleet: Fleet,
        model: ModelSpec,
        clock: Clock,
        kubeconfig: Path | None = None,
        supervisor: Supervisor | None = None,
    ) -> KubernetesDiscovery:
        """Discovery for a model whose fleet-file entry has `discovery.kubernetes`; the
        configuration loads now, so a missing one is a ConfigError at start-up."""
        spec = _kubernetes_spec(model)
        config = load_config(model, kubeconfig)
        return cls(config, fleet, model, spec, clock, supervisor=supervisor)

    @property
    def source(self) -> str:
        return f"the EndpointSlices of service {self.namespace}/{self.spec.service}"

    # -- service ------------------------------------------------------------------------
    async def start(self) -> None:
        self.fleet.declare_model(self.model.name)
        self._client = AsyncClient(
            config=self.config, namespace=self.namespace, timeout=httpx2.Timeout(self.timeout_s)
        )
        # Supervised: an error `run` does not expect restarts it (a fresh list) with backoff.
        self._tasks = [
            self.supervisor.spawn(f"discovery/{self.model.name}", self.run),
            self.supervisor.spawn(f"discovery-tick/{self.model.name}", self._tick),
        ]

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        """List, then watch; forever (until cancelled), whatever the API does."""
        failures = 0
        expired = False  # a watch ended in 410; another one at once, with no event, backs off
        while True:
            watching = False
            try:
                version = await self._list()
                self._recovered()
                failures = 0
                watching = True
                await self._watch_bounded(version)
                expired = False
                continue  # the watch outlived its bound: list afresh, now
            except httpx2.HTTPError as exc:
                if watching and _status_code(exc) == 410 and not (expired and self._idle_watch):
                    log.info("watch of %s expired (410 Gone); listing again", self.source)
                    expired = True  # list afresh at once
                    continue
                failures += 1
                self._failed(self._error(exc))
            except ValueError as exc:  # a body or watch line that does not decode
                failures += 1
                self._failed(DiscoveryError(f"cannot read {self.source}: bad answer: {exc}"))
            expired = False
            await self.clock.sleep(self.backoff.delay_s(failures, self.jitter()))

    async def _list(self) -> str | None:
        assert self._client is not None
        listing = self._client.list(
            EndpointSlice,
            namespace=self.namespace,
            labels={SERVICE_NAME_LABEL: self.spec.service},
        )
        slices = {s.metadata.name: s async for s in listing if s.metadata and s.metadata.name}
        self._slices = {name: self._read(name, s) for name, s in slices.items()}
        self.reconcile()
        try:
            return listing.resourceVersion
        except NotReadyError:  # no version: the watch then starts with every slice as ADDED
            return None

    async def _watch_bounded(self, version: str | None) -> None:
        """Watch, raising what the watch raises; return when it has run `WATCH_SLACK_S` past
        the time the server was asked to end it. lightkube reads a watch without a read
        timeout (it resumes one the server ends), so this bound is what replaces a connection
        that died without a word."""
        timeout_s = int(WATCH_TIMEOUT_S * (1 + self.jitter()))
        watch = asyncio.create_task(self._watch(version, timeout_s))
        deadline = asyncio.create_task(self.clock.sleep(timeout_s + WATCH_SLACK_S))
        try:
            await asyncio.wait((watch, deadline), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            deadline.cancel()
            await asyncio.gather(watch, deadline, return_exceptions=True)
        if not watch.cancelled() and (error := watch.exception()) is not None:
            raise error

    async def _watch(self, version: str | None, timeout_s: int) -> None:
        assert self._client is not None
        events = self._client.watch(
            EndpointSlice,
            namespace=self.namespace,
            labels={SERVICE_NAME_LABEL: self.spec.service},
            resource_version=version,
            server_timeout=timeout_s,
        )
        self._idle_watch = True
        async for kind, endpoint_slice in events:
            self._idle_watch = False
            name = endpoint_slice.metadata.name if endpoint_slice.metadata else None
            if name is None:
                continue
            if kind == "DELETED":
                self._slices.pop(name, None)
                self._problems.pop(name, None)
            elif kind in ("ADDED", "MODIFIED"):
                self._slices[name] = self._read(name, endpoint_slice)
            self.reconcile()

    async def _tick(self) -> None:
        """Removes replicas that left the slices once their requests finish (no event says so)."""
        while True:
            await self.clock.sleep(self.tick_s)
            self.reconcile()

    # -- applying decisions -------------------------------------------------------------
    def reconcile(self) -> None:
        held = {}
        for url, rid in list(self._ids.items()):
            replica = self.fleet.get(rid)
            if replica is None:  # someone else removed it
                del self._ids[url]
                continue
            draining = replica.state is ReplicaState.DRAINING
            held[url] = Held(draining=draining, in_flight=replica.in_flight)
        now = self.clock.now()
        changes = plan(merge(self._slices), held, self._gone_since, now, self.spec.remove_after_s)
        self._gone_since = dict(changes.gone_since)
        for url in changes.remove:
            self.fleet.remove(self._ids.pop(url))
            log.info("replica %s of %s left %s: removed", url, self.model.name, self.source)
        for url in changes.drain:
            self.fleet.drain(self._ids[url], now)
            log.info("replica %s of %s stopped serving: draining", url, self.model.name)
        for url in changes.add:
            rid = self._free_id(url)
            self.fleet.add(
                Replica(
                    id=rid,
                    url=url,
                    model=self.model.name,
                    max_concurrency=self.model.max_concurrency,
                    state_since=now,
                    name=next((s.names[url] for s in self._slices.values() if url in s.names), rid),
                )
            )
            self._ids[url] = rid
            log.info("replica %s of %s found in %s", url, self.model.name, self.source)

    def _free_id(self, url: str) -> str:
        rid = replica_id(url)
        return rid if self.fleet.get(rid) is None else f"{self.model.name}@{rid}"

    def _read(self, name: str, endpoint_slice: EndpointSlice) -> SliceEndpoints:
        endpoints = slice_endpoints(endpoint_slice, self.spec.port, self.spec.scheme)
        if endpoints.problem is not None and self._problems.get(name) != endpoints.problem:
            log.warning("EndpointSlice %s/%s: %s", self.namespace, name, endpoints.problem)
        if endpoints.problem is None:
            self._problems.pop(name, None)
        else:
            self._problems[name] = endpoints.problem
        return endpoints

    # -- errors -------------------------------------------------------------------------
    def _failed(self, error: DiscoveryError) -> None:
        if self._outage is None:
            log.warning("%s; retrying with backoff, replicas stay as they were", error)
        self._outage = str(error)

    def _recovered(self) -> None:
        if self._outage is not None:
            log.warning("listing %s works again", self.source)
            self._outage = None

    def _error(self, exc: httpx2.HTTPError) -> DiscoveryError:
        """One line naming the Service and what failed."""
        doing = f"cannot read {self.source}"
        code = _status_code(exc)
        if code is None:
            server = self.config.cluster.server
            reason = str(exc) or type(exc).__name__
            return DiscoveryError(
                f"{doing}: the Kubernetes API at {server} is unreachable: {reason}"
            )
        message = _status_message(exc)
        if code == 403:
            message += (
                "; the service account or user needs the verbs list and watch on "
                f"endpointslices.discovery.k8s.io in namespace {self.namespace}"
            )
        return DiscoveryError(f"{doing}: HTTP {code}: {message}")


def load_config(model: ModelSpec, kubeconfig: Path | None = None) -> SingleConfig:
    """The Kubernetes configuration the model's discovery uses; ConfigError if none loads."""
    spec = _kubernetes_spec(model)
    purpose = f"to discover the replicas of model {model.name} (service {spec.service})"
    return load_kubeconfig(kubeconfig, spec.context, purpose=purpose)


def _kubernetes_spec(model: ModelSpec) -> KubernetesDiscoverySpec:
    if model.discovery is None:
        raise ValueError(f"model {model.name!r} has no discovery section")
    return model.discovery.kubernetes


def _status_code(exc: httpx2.HTTPError) -> int | None:
    """The HTTP status behind an API error: an ERROR event, an error answer, or none."""
    if isinstance(exc, ApiError):
        return exc.status.code
    if isinstance(exc, httpx2.HTTPStatusError):
        return exc.response.status_code
    return None


def _status_message(exc: httpx2.HTTPError) -> str:
    if isinstance(exc, ApiError):
        return exc.status.message or exc.status.reason or ""
    assert isinstance(exc, httpx2.HTTPStatusError)
    try:  # a failed watch answer is a stream that lightkube closed unread
        return exc.response.text[:200].strip()
    except httpx2.ResponseNotRead:
        return exc.response.reason_phrase
