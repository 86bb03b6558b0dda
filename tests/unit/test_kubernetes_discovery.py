"""KubernetesDiscovery against a mock API server (kmock on 127.0.0.1): the exact LIST and WATCH
of a Service's EndpointSlices, and the Fleet after each list, event, expiry and outage; the
pure parts (what a slice says, the plan, the backoff) as scenario tables."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from kmock import RawHandler, Server
from kmock._internal.rendering import Response  # kmock.Response; its __all__ leaves it out
from lightkube import KubeConfig
from lightkube.config.kubeconfig import SingleConfig
from lightkube.resources.discovery_v1 import EndpointSlice

from fleetserve.config import DiscoverySpec, KubernetesDiscoverySpec, ModelSpec, load_fleet_file
from fleetserve.errors import ConfigError
from fleetserve.fleet.endpoint_slices import Held, SliceEndpoints, merge, plan, slice_endpoints
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.kubernetes_discovery import KubernetesDiscovery
from fleetserve.fleet.processes import LOOPBACK, free_port
from fleetserve.fleet.replica import Replica
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.testing.clock import FakeClock

NS, SERVICE, MODEL = "llm", "vllm-llama", "llama"
SLICES_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
SELECTOR = f"kubernetes.io/service-name={SERVICE}"
JITTER = 0.5  # every random draw of the discovery under test
WATCH_TIMEOUT = "450"  # 300 s * (1 + JITTER)
TICK_S = 1.0
WATCH_BOUND_S = 480.0  # the watch is dropped and the slices listed again this long after it began


# -- building EndpointSlices ----------------------------------------------------------------
def endpoint(
    address: str,
    *,
    ready: bool | None = True,
    terminating: bool | None = None,
    pod: str | None = None,
) -> dict[str, Any]:
    conditions: dict[str, Any] = {}
    if ready is not None:
        conditions["ready"] = ready
    if terminating is not None:
        conditions["terminating"] = terminating
    found: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if pod is not None:
        found["targetRef"] = {"kind": "Pod", "name": pod, "namespace": NS}
    return found


def endpoint_slice(
    name: str,
    endpoints: list[dict[str, Any]],
    ports: Sequence[tuple[str | None, int]] = (("http", 8000),),
    service: str = SERVICE,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


class FakeSliceApi:
    """The EndpointSlice LIST and WATCH of one namespace, as an API server answers them: each
    change gets a new resourceVersion and goes to the open watches as an event. The test also
    scripts failures (the next requests' statuses) and expiries (an ERROR 410 event)."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.version = 100
        self.slices: dict[str, dict[str, Any]] = {}
        self.failures: list[int] = []
        self.watches: list[asyncio.Queue[dict[str, Any] | None]] = []
        handler[f"get {SLICES_PATH}"] << self._answer

    def _answer(self, request: Any) -> Response:
        # Always a whole Response: kmock keeps a reaction's last status for the next answers.
        json = {"Content-Type": "application/json"}
        if self.failures:
            code = self.failures.pop(0)
            return Response(status=code, headers=json, payload=status(code, "Failed", "no"))
        if request.params.get("watch") == "true":
            queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
            self.watches.append(queue)
            return Response(status=200, headers=json, payload=self._stream(queue))
        listing = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": str(self.version)},
            "items": list(self.slices.values()),
        }
        return Response(status=200, headers=json, payload=listing)

    @staticmethod
    async def _stream(queue: asyncio.Queue[dict[str, Any] | None]) -> AsyncIterator[Any]:
        yield b""  # the headers go at once, as the API server sends them
        while (event := await queue.get()) is not None:
            yield event

    def put(self, obj: dict[str, Any], *, silently: bool = False) -> None:
        """Create or replace a slice; `silently`: no event (as if a watch missed it)."""
        self.version += 1
        name = obj["metadata"]["name"]
        kind = "MODIFIED" if name in self.slices else "ADDED"
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}
        self.slices[name] = obj
        if not silently:
            self._send({"type": kind, "object": obj})

    def delete(self, name: str) -> None:
        self.version += 1
        obj = self.slices.pop(name)
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}
        self._send({"type": "DELETED", "object": obj})

    def expire(self) -> None:
        """The watched version is too old: an ERROR event with a 410 Status, then the end."""
        self._send({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
        self._close()

    def _send(self, event: dict[str, Any]) -> None:
        for queue in self.watches:
            queue.put_nowait(event)

    def _close(self) -> None:
        for queue in self.watches:
            queue.put_nowait(None)
        self.watches = []

    def requests(self) -> list[tuple[str, dict[str, str]]]:
        """("LIST" or "WATCH", query) of each request so far."""
        return [
            ("WATCH" if r.params.get("watch") == "true" else "LIST", dict(r.params))
            for r in self.handler
        ]


def listed() -> tuple[str, dict[str, str]]:
    return ("LIST", {"labelSelector": SELECTOR})


def watched(version: int) -> tuple[str, dict[str, str]]:
    query = {"watch": "true", "timeoutSeconds": WATCH_TIMEOUT, "resourceVersion": str(version),
             "labelSelector": SELECTOR}  # fmt: skip
    return ("WATCH", query)


def kube_config(server: str) -> SingleConfig:
    config = KubeConfig.from_dict(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "mock", "cluster": {"server": server}}],
            "users": [{"name": "me", "user": {"token": "sekret"}}],
            "contexts": [{"name": "mock", "context": {"cluster": "mock", "user": "me"}}],
            "current-context": "mock",
        }
    ).get()
    assert config is not None
    return config


class RecordingClock(FakeClock):
    def __init__(self) -> None:
        super().__init__()
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await super().sleep(seconds)

    def backoffs(self) -> list[float]:
        return [s for s in self.slept if s not in (TICK_S, WATCH_BOUND_S)]


def model_spec(port: str | int | None = "http", remove_after_s: float = 30.0) -> ModelSpec:
    k8s = KubernetesDiscoverySpec(
        service=SERVICE, namespace=NS, port=port, remove_after_s=remove_after_s
    )
    return ModelSpec(name=MODEL, discovery=DiscoverySpec(kubernetes=k8s))


def discovery(server: str, fleet: Fleet, clock: FakeClock, spec: ModelSpec) -> KubernetesDiscovery:
    assert spec.discovery is not None
    return KubernetesDiscovery(
        kube_config(server), fleet, spec, spec.discovery.kubernetes, clock,
        jitter=lambda: JITTER, tick_s=TICK_S,
    )  # fmt: skip


def view(fleet: Fleet) -> dict[str, str]:
    return {r.url: r.state.value for r in fleet.replicas(MODEL)}


async def eventually(check: Callable[[], bool], what: Callable[[], object]) -> None:
    """Wait (real time, bounded) for I/O on loopback to make `check` true."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached within 5 s; now: {what()}")


class Harness:
    def __init__(self, api: FakeSliceApi, fleet: Fleet, clock: RecordingClock) -> None:
        self.api, self.fleet, self.clock = api, fleet, clock

    async def fleet_is(self, expected: dict[str, str]) -> None:
        await eventually(lambda: view(self.fleet) == expected, lambda: view(self.fleet))

    async def requests_are(self, expected: list[tuple[str, dict[str, str]]]) -> None:
        await eventually(lambda: self.api.requests() == expected, self.api.requests)

    async def watching(self, count: int = 1) -> None:
        await eventually(lambda: len(self.api.watches) == count, self.api.requests)


@pytest.fixture
async def harness_factory() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    started: list[KubernetesDiscovery] = []
    async with RawHandler() as handler, Server(handler) as server:
        api = FakeSliceApi(handler)
        url = str(server.url).rstrip("/")

        async def make(
            *slices: dict[str, Any], spec: ModelSpec | None = None, fleet: Fleet | None = None
        ) -> Harness:
            for obj in slices:
                api.put(obj, silently=True)
            fleet, clock = Fleet() if fleet is None else fleet, RecordingClock()
            watcher = discovery(url, fleet, clock, spec or model_spec())
            await watcher.start()
            started.append(watcher)
            return Harness(api, fleet, clock)

        try:
            yield make
        finally:
            for watcher in started:
                await watcher.stop()
            api._close()


A, B = "127.0.0.1", "127.0.0.2"  # loopback addresses; nothing connects to them here
URL_A, URL_B = f"http://{A}:8000", f"http://{B}:8000"
STARTING, DRAINING = ReplicaState.STARTING.value, ReplicaState.DRAINING.value
Change = Callable[[FakeSliceApi], None]


def put(obj: dict[str, Any]) -> Change:
    return lambda api: api.put(obj)


def delete(name: str) -> Change:
    return lambda api: api.delete(name)


@pytest.mark.parametrize(
    ("listed_slices", "changes", "expected"),
    [
        pytest.param([endpoint_slice("s1", [endpoint(A)])], [], {URL_A: STARTING},
                     id="listed-ready-pod-starts"),
        pytest.param([endpoint_slice("s1", [endpoint(A, ready=False)])], [], {},
                     id="listed-unready-pod-is-not-added"),
        pytest.param([endpoint_slice("s1", [endpoint(A, ready=None)])], [], {URL_A: STARTING},
                     id="unknown-readiness-counts-as-ready"),
        pytest.param([], [put(endpoint_slice("s1", [endpoint(A)]))], {URL_A: STARTING},
                     id="watched-pod-becomes-ready"),
        pytest.param([endpoint_slice("s1", [endpoint(A, ready=False)])],
                     [put(endpoint_slice("s1", [endpoint(A)]))], {URL_A: STARTING},
                     id="unready-pod-turns-ready"),
        pytest.param([endpoint_slice("s1", [endpoint(A), endpoint(B)])],
                     [put(endpoint_slice("s1", [endpoint(A, ready=False, terminating=True),
                                                endpoint(B)]))],
                     {URL_A: DRAINING, URL_B: STARTING}, id="terminating-drains"),
        pytest.param([endpoint_slice("s1", [endpoint(A)])],
                     [put(endpoint_slice("s1", [endpoint(A, ready=False)]))],
                     {URL_A: DRAINING}, id="not-ready-drains"),
        pytest.param([endpoint_slice("s1", [endpoint(A), endpoint(B)])],
                     [put(endpoint_slice("s1", [endpoint(B)]))], {URL_B: STARTING},
                     id="endpoint-gone-is-removed"),
        pytest.param([endpoint_slice("s1", [endpoint(A)]), endpoint_slice("s2", [endpoint(B)])],
                     [delete("s1")], {URL_B: STARTING}, id="slice-deleted-removes-its-pods"),
        pytest.param([endpoint_slice("s1", [endpoint(A)]), endpoint_slice("s2", [endpoint(B)])],
                     [], {URL_A: STARTING, URL_B: STARTING}, id="two-slices-one-service"),
        pytest.param([endpoint_slice("s1", [endpoint(A)]),
                      endpoint_slice("s2", [endpoint(A, ready=False)])],
                     [], {URL_A: STARTING}, id="pod-in-two-slices-ready-in-one"),
        pytest.param([endpoint_slice("s1", [endpoint(A)],
                                     ports=[("metrics", 9090), ("http", 8001)])],
                     [], {f"http://{A}:8001": STARTING}, id="port-by-name"),
        pytest.param([endpoint_slice("s1", [endpoint(A)], ports=[("grpc", 9000)])], [], {},
                     id="no-port-of-that-name-adds-nothing"),
    ],
)  # fmt: skip
async def test_list_then_watch_keeps_the_fleet_in_step(
    harness_factory: Callable[..., Awaitable[Harness]],
    listed_slices: list[dict[str, Any]],
    changes: list[Change],
    expected: dict[str, str],
) -> None:
    h = await harness_factory(*listed_slices)
    await h.watching()
    for change in changes:
        change(h.api)
    await h.fleet_is(expected)
    await asyncio.sleep(0.05)  # nothing else arrives later
    assert view(h.fleet) == expected
    listed_at = 100 + len(listed_slices)
    assert h.api.requests() == [listed(), watched(listed_at)]


async def test_replica_ids_and_model(harness_factory: Callable[..., Awaitable[Harness]]) -> None:
    h = await harness_factory(endpoint_slice("s1", [endpoint(A)]))
    await h.fleet_is({URL_A: STARTING})
    (replica,) = h.fleet.replicas()
    assert (replica.id, replica.model, replica.url) == (f"{A}:8000", MODEL, URL_A)
    assert replica.name == replica.id  # no targetRef: the name is the id


async def test_a_replica_is_named_after_its_pod(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    pod = "vllm-llama-7d9f8b6c5-x2k4q"
    h = await harness_factory(endpoint_slice("s1", [endpoint(A, pod=pod), endpoint(B)]))
    await h.fleet_is({URL_A: STARTING, URL_B: STARTING})
    names = {r.url: r.name for r in h.fleet.replicas()}
    assert names == {URL_A: pod, URL_B: f"{B}:8000"}


async def test_a_gone_replica_with_requests_in_flight_drains_until_they_finish(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(endpoint_slice("s1", [endpoint(A), endpoint(B)]))
    await h.watching()
    await h.fleet_is({URL_A: STARTING, URL_B: STARTING})
    rid = f"{A}:8000"
    h.fleet.begin(rid)
    h.api.put(endpoint_slice("s1", [endpoint(B)]))
    await h.fleet_is({URL_A: DRAINING, URL_B: STARTING})
    await h.clock.advance(TICK_S * 3)
    assert view(h.fleet) == {URL_A: DRAINING, URL_B: STARTING}  # still one in flight
    h.fleet.end(rid)
    await h.clock.advance(TICK_S)
    assert view(h.fleet) == {URL_B: STARTING}


async def test_a_gone_replica_is_removed_after_the_grace_period_even_if_busy(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(
        endpoint_slice("s1", [endpoint(A)]), spec=model_spec(remove_after_s=10.0)
    )
    await h.watching()
    await h.fleet_is({URL_A: STARTING})
    h.fleet.begin(f"{A}:8000")
    h.api.put(endpoint_slice("s1", []))
    await h.fleet_is({URL_A: DRAINING})
    await h.clock.advance(9.0)
    assert view(h.fleet) == {URL_A: DRAINING}
    await h.clock.advance(1.0)
    assert view(h.fleet) == {}


async def test_a_drained_replica_that_serves_again_is_probed_afresh(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(endpoint_slice("s1", [endpoint(A)]))
    await h.watching()
    await h.fleet_is({URL_A: STARTING})
    h.fleet.probe_passed(f"{A}:8000", 0.0)
    h.api.put(endpoint_slice("s1", [endpoint(A, ready=False)]))
    await h.fleet_is({URL_A: DRAINING})
    h.api.put(endpoint_slice("s1", [endpoint(A)]))
    await h.fleet_is({URL_A: STARTING})


async def test_an_expired_watch_lists_again_at_once(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(endpoint_slice("s1", [endpoint(A)]))
    await h.watching()
    await h.fleet_is({URL_A: STARTING})
    h.api.put(endpoint_slice("s1", [endpoint(B)]), silently=True)  # missed by the watch
    h.api.expire()
    await h.requests_are([listed(), watched(101), listed(), watched(102)])
    await h.fleet_is({URL_B: STARTING})
    assert h.clock.backoffs() == []  # no backoff: expiry is routine


async def test_a_silent_watch_is_dropped_after_its_bound_and_the_slices_listed_again(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(endpoint_slice("s1", [endpoint(A)]))
    await h.watching()
    await h.fleet_is({URL_A: STARTING})
    h.api.put(endpoint_slice("s1", [endpoint(B)]), silently=True)  # lost with the connection
    await h.clock.advance(WATCH_BOUND_S - TICK_S)
    assert h.api.requests() == [listed(), watched(101)]
    await h.clock.advance(TICK_S)
    await h.requests_are([listed(), watched(101), listed(), watched(102)])
    await h.fleet_is({URL_B: STARTING})
    assert h.clock.backoffs() == []


@pytest.mark.parametrize(
    ("failures", "backoffs"),
    [
        pytest.param([503], [0.375], id="one-503"),
        pytest.param([503, 500, 429], [0.375, 0.75, 1.5], id="three-errors-double"),
        pytest.param([403] * 9, [0.375, 0.75, 1.5, 3.0, 6.0, 12.0, 22.5, 22.5, 22.5],
                     id="capped-at-max"),
    ],
)  # fmt: skip
async def test_api_errors_back_off_then_recover(
    harness_factory: Callable[..., Awaitable[Harness]],
    failures: list[int],
    backoffs: list[float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "fleetserve.fleet.kubernetes_discovery")
    h = await harness_factory(endpoint_slice("s1", [endpoint(A)]))
    h.api.failures = list(failures)
    for step, delay in enumerate(backoffs, start=1):
        await h.requests_are([listed()] * step)
        await eventually(lambda: h.clock.sleepers == 2, h.clock.backoffs)  # tick + backoff
        assert view(h.fleet) == {}
        await h.clock.advance(delay)
    await h.requests_are([listed()] * (len(failures) + 1) + [watched(101)])
    await h.fleet_is({URL_A: STARTING})
    assert h.clock.backoffs() == backoffs
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    code = failures[0]
    assert warnings == [
        f"cannot read the EndpointSlices of service {NS}/{SERVICE}: HTTP {code}: no"
        + ("; the service account or user needs the verbs list and watch on "
           f"endpointslices.discovery.k8s.io in namespace {NS}" if code == 403 else "")
        + "; retrying with backoff, replicas stay as they were",
        f"listing the EndpointSlices of service {NS}/{SERVICE} works again",
    ]  # fmt: skip


class FleetWithABug(Fleet):
    """A Fleet whose first `add` fails as no caller expects (a bug, not an API error)."""

    def __init__(self) -> None:
        super().__init__()
        self.adds = 0

    def add(self, replica: Replica) -> None:
        self.adds += 1
        if self.adds == 1:
            raise RuntimeError("a bug in add")
        super().add(replica)


async def test_an_unexpected_error_restarts_discovery_and_it_keeps_watching(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(endpoint_slice("s1", [endpoint(A)]), fleet=FleetWithABug())
    await h.requests_are([listed()])
    await eventually(lambda: h.clock.sleepers == 2, h.clock.backoffs)  # tick + restart backoff
    await h.clock.advance(0.5)  # the supervisor's first backoff is 0.5 s at most
    await h.requests_are([listed(), listed(), watched(101)])
    await h.fleet_is({URL_A: STARTING})
    h.api.put(endpoint_slice("s2", [endpoint(B)]))
    await h.fleet_is({URL_A: STARTING, URL_B: STARTING})


async def test_a_failed_watch_keeps_the_fleet_and_lists_again_after_backoff(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(endpoint_slice("s1", [endpoint(A)]))
    await h.watching()
    await h.fleet_is({URL_A: STARTING})
    h.api.failures = [500]
    h.api.expire()  # ends the watch; the first re-list then fails
    await h.requests_are([listed(), watched(101), listed()])
    await eventually(lambda: h.clock.sleepers == 2, h.clock.backoffs)
    assert view(h.fleet) == {URL_A: STARTING}  # the last view stays meanwhile
    await h.clock.advance(0.375)
    await h.requests_are([listed(), watched(101), listed(), listed(), watched(101)])


async def test_an_unreachable_api_is_retried_until_it_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    fleet, clock = Fleet(), RecordingClock()
    watcher = discovery(f"http://{LOOPBACK}:{port}", fleet, clock, model_spec())
    await watcher.start()
    try:
        for delay in (0.375, 0.75, 1.5):
            await eventually(lambda: clock.sleepers == 2, clock.backoffs)
            await clock.advance(delay)
        async with RawHandler() as handler, Server(handler, port=port):
            api = FakeSliceApi(handler)
            api.put(endpoint_slice("s1", [endpoint(A)]), silently=True)
            await eventually(lambda: clock.sleepers == 2, clock.backoffs)
            await clock.advance(3.0)
            await eventually(lambda: view(fleet) == {URL_A: STARTING}, lambda: view(fleet))
            assert api.requests() == [listed(), watched(101)]
            await watcher.stop()
            api._close()
    finally:
        await watcher.stop()
    assert clock.backoffs() == [0.375, 0.75, 1.5, 3.0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one for the outage, one when it ends
    assert warnings[0].startswith(
        f"cannot read the EndpointSlices of service {NS}/{SERVICE}: the Kubernetes API at "
        f"http://{LOOPBACK}:{port} is unreachable: "
    )


# -- the pure parts -------------------------------------------------------------------------
def parsed(obj: dict[str, Any], port: str | int | None = "http") -> SliceEndpoints:
    decoded = EndpointSlice.from_dict(obj)
    assert isinstance(decoded, EndpointSlice)
    return slice_endpoints(decoded, port)


@pytest.mark.parametrize(
    ("obj", "port", "serving", "problem"),
    [
        pytest.param(endpoint_slice("s", [endpoint(A)]), "http", {URL_A: True}, None,
                     id="ready"),
        pytest.param(endpoint_slice("s", [endpoint(A, ready=False)]), "http", {URL_A: False},
                     None, id="not-ready"),
        pytest.param(endpoint_slice("s", [endpoint(A, ready=True, terminating=True)]), "http",
                     {URL_A: False}, None, id="terminating-overrides-ready"),
        pytest.param(endpoint_slice("s", [endpoint(A)], ports=[(None, 8080)]), None,
                     {f"http://{A}:8080": True}, None, id="only-port-unnamed"),
        pytest.param(endpoint_slice("s", [endpoint(A)], ports=[("a", 1), ("b", 2)]), 2,
                     {f"http://{A}:2": True}, None, id="port-by-number"),
        pytest.param(endpoint_slice("s", [endpoint(A)], ports=[("a", 1), ("b", 2)]), None, {},
                     "the slice has several ports (a, b); say which with `port:`",
                     id="several-ports-none-chosen"),
        pytest.param(endpoint_slice("s", [endpoint(A)], ports=[("grpc", 9000)]), "http", {},
                     "the slice has no port 'http' (its ports: grpc)", id="no-such-port"),
        pytest.param(endpoint_slice("s", [], ports=[("grpc", 9000)]), "http", {}, None,
                     id="empty-slice-has-no-problem"),
        pytest.param(endpoint_slice("s", [endpoint("fd00::1")]), "http",
                     {"http://[fd00::1]:8000": True}, None, id="ipv6-in-brackets"),
    ],
)  # fmt: skip
def test_slice_endpoints(
    obj: dict[str, Any],
    port: str | int | None,
    serving: dict[str, bool],
    problem: str | None,
) -> None:
    assert parsed(obj, port) == SliceEndpoints(serving, problem)


def test_slice_endpoints_name_the_pods_behind_them() -> None:
    obj = endpoint_slice("s", [endpoint(A, pod="pod-a"), endpoint(B)])
    assert parsed(obj).names == {URL_A: "pod-a"}


def test_merge_takes_serving_from_any_slice() -> None:
    slices = {
        "s1": SliceEndpoints({URL_A: False, URL_B: True}),
        "s2": SliceEndpoints({URL_A: True}),
        "s3": SliceEndpoints({URL_B: False}),
    }
    assert merge(slices) == {URL_A: True, URL_B: True}


BUSY, IDLE, DRAINED = Held(False, 2), Held(False, 0), Held(True, 1)


@pytest.mark.parametrize(
    ("serving", "held", "gone", "now", "expected"),
    [
        pytest.param({URL_A: True}, {}, {}, 0.0, ((), (), (URL_A,), {}), id="new-ready-added"),
        pytest.param({URL_A: False}, {}, {}, 0.0, ((), (), (), {}), id="new-unready-ignored"),
        pytest.param({URL_A: True}, {URL_A: BUSY}, {}, 0.0, ((), (), (), {}), id="steady"),
        pytest.param({URL_A: False}, {URL_A: BUSY}, {}, 0.0, ((), (URL_A,), (), {}),
                     id="unready-drained"),
        pytest.param({URL_A: False}, {URL_A: DRAINED}, {}, 0.0, ((), (), (), {}),
                     id="drained-stays-drained"),
        pytest.param({}, {URL_A: IDLE}, {}, 0.0, ((URL_A,), (), (), {}), id="gone-idle-removed"),
        pytest.param({}, {URL_A: BUSY}, {}, 5.0, ((), (URL_A,), (), {URL_A: 5.0}),
                     id="gone-busy-drained-and-timed"),
        pytest.param({}, {URL_A: DRAINED}, {URL_A: 5.0}, 34.0, ((), (), (), {URL_A: 5.0}),
                     id="gone-busy-within-grace"),
        pytest.param({}, {URL_A: DRAINED}, {URL_A: 5.0}, 35.0, ((URL_A,), (), (), {}),
                     id="gone-busy-past-grace-removed"),
        pytest.param({URL_A: True}, {URL_A: Held(True, 0)}, {}, 0.0,
                     ((URL_A,), (), (URL_A,), {}), id="serving-again-re-added"),
        pytest.param({URL_A: True}, {URL_A: DRAINED}, {}, 0.0, ((), (), (), {}),
                     id="serving-again-waits-for-in-flight"),
        pytest.param({URL_A: True}, {URL_A: DRAINED}, {URL_A: 1.0}, 2.0, ((), (), (), {}),
                     id="back-before-removal-forgets-when-it-left"),
    ],
)  # fmt: skip
def test_plan(
    serving: dict[str, bool],
    held: dict[str, Held],
    gone: dict[str, float],
    now: float,
    expected: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], dict[str, float]],
) -> None:
    result = plan(serving, held, gone, now, remove_after_s=30.0)
    assert (result.remove, result.drain, result.add, dict(result.gone_since)) == expected


# -- the fleet file -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("{kubernetes: {service: s, namespace: n, port: http}}",
                     KubernetesDiscoverySpec(service="s", namespace="n", port="http"),
                     id="port-by-name"),
        pytest.param("{kubernetes: {service: s, port: 8000, remove_after_s: 5}}",
                     KubernetesDiscoverySpec(service="s", port=8000, remove_after_s=5.0),
                     id="port-by-number"),
        pytest.param("{kubernetes: {service: s}}", KubernetesDiscoverySpec(service="s"),
                     id="defaults"),
    ],
)  # fmt: skip
def test_fleet_file_discovery(tmp_path: Path, text: str, expected: KubernetesDiscoverySpec) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(f"models:\n  - name: m\n    discovery: {text}\n")
    (spec,) = load_fleet_file(path).models
    assert spec.discovery == DiscoverySpec(kubernetes=expected)
    assert spec.replicas == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("replicas: [http://127.0.0.1:1]\n    discovery: {kubernetes: {service: s}}",
                     "model 'm': give either `replicas` or `discovery`, not both", id="both"),
        pytest.param("discovery: {kubernetes: {service: ''}}", "service", id="empty-service"),
        pytest.param("discovery: {kubernetes: {service: s, labels: x}}", "labels",
                     id="unknown-field"),
        pytest.param("discovery: {consul: {service: s}}", "consul", id="unknown-source"),
    ],
)  # fmt: skip
def test_fleet_file_discovery_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(f"models:\n  - name: m\n    {text}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_fleet_file(path)
