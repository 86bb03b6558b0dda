"""EndpointSlices -> replicas, and the changes that bring a Fleet in step with them (pure).

Kubernetes splits a Service's endpoints over one or more EndpointSlices (labelled
`kubernetes.io/service-name`). Each endpoint has addresses and conditions; each slice lists
named ports. Following the EndpointSlice API's guidance, `ready: null` counts as ready,
`terminating: null` as not terminating, and only an endpoint's first address is used (its
addresses are fungible). An endpoint takes traffic when it is ready and not terminating; one
address listed by two slices (as during a slice's rewrite) takes traffic if either says so.

`plan` compares what the slices say with the replicas this discovery put in the Fleet:
a new serving endpoint is added (starting, until the gateway's probe passes), one that stops
serving is drained (no new requests; in-flight ones finish), and one that left the slices is
removed once nothing is in flight on it, or `remove_after_s` after it left.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lightkube.models.discovery_v1 import EndpointPort
from lightkube.resources.discovery_v1 import EndpointSlice

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

PortSelector = str | int | None


@dataclass(frozen=True, slots=True)
class SliceEndpoints:
    """What one slice says: serving flag per replica URL, and why it says nothing if so;
    `names`: the pod behind each URL, where the endpoint's targetRef names one."""

    serving: Mapping[str, bool]
    problem: str | None = None
    names: Mapping[str, str] = field(default_factory=dict)


def slice_endpoints(
    endpoint_slice: EndpointSlice, port: PortSelector, scheme: str = "http"
) -> SliceEndpoints:
    endpoints = endpoint_slice.endpoints or []
    chosen = _choose_port(endpoint_slice.ports or [], port)
    if isinstance(chosen, str):
        return SliceEndpoints({}, chosen if endpoints else None)
    serving: dict[str, bool] = {}
    names: dict[str, str] = {}
    for endpoint in endpoints:
        if not endpoint.addresses:
            continue
        conditions = endpoint.conditions
        ready = conditions is None or conditions.ready is not False
        terminating = conditions is not None and conditions.terminating is True
        url = f"{scheme}://{_host(endpoint.addresses[0])}:{chosen}"
        serving[url] = serving.get(url, False) or (ready and not terminating)
        target = endpoint.targetRef
        if target is not None and target.kind in (None, "Pod") and target.name:
            names[url] = target.name
    return SliceEndpoints(serving, names=names)


def _choose_port(ports: list[EndpointPort], wanted: PortSelector) -> int | str:
    """The port number to use, or a line saying why there is none."""
    numbered = [p for p in ports if p.port is not None]
    if isinstance(wanted, str):
        matches = [p.port for p in numbered if p.name == wanted]
    elif isinstance(wanted, int):
        matches = [p.port for p in numbered if p.port == wanted]
    else:
        matches = [p.port for p in numbered]
        if len(matches) > 1:
            names = ", ".join(p.name or str(p.port) for p in numbered)
            return f"the slice has several ports ({names}); say which with `port:`"
    if not matches or matches[0] is None:
        names = ", ".join(p.name or str(p.port) for p in numbered) or "none"
        return f"the slice has no port {wanted!r} (its ports: {names})"
    return matches[0]


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address  # IPv6 goes in brackets in a URL


def merge(slices: Mapping[str, SliceEndpoints]) -> dict[str, bool]:
    """Serving flag per URL over all slices of the Service."""
    serving: dict[str, bool] = {}
    for endpoints in slices.values():
        for url, ok in endpoints.serving.items():
            serving[url] = serving.get(url, False) or ok
    return serving


@dataclass(frozen=True, slots=True)
class Held:
    """A replica this discovery put in the Fleet, as the Fleet sees it now."""

    draining: bool
    in_flight: int


@dataclass(frozen=True, slots=True)
class SlicePlan:
    """Fleet changes, applied in this order: remove, drain, add (URLs)."""

    remove: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    add: tuple[str, ...] = ()
    gone_since: Mapping[str, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.remove or self.drain or self.add)


def plan(
    serving: Mapping[str, bool],
    held: Mapping[str, Held],
    gone_since: Mapping[str, float],
    now: float,
    remove_after_s: float,
) -> SlicePlan:
    """The changes that make the held replicas match `serving`; `gone_since` (when each held
    URL left the slices) comes in and goes out as the plan's state."""
    remove: list[str] = []
    drain: list[str] = []
    add: list[str] = []
    gone: dict[str, float] = {}
    for url, replica in held.items():
        if url in serving:
            if serving[url] and replica.draining and replica.in_flight == 0:
                remove.append(url)  # serving again: back in as starting, probed afresh
                add.append(url)
            elif not serving[url] and not replica.draining:
                drain.append(url)
            continue
        left_at = gone_since.get(url, now)
        if replica.in_flight == 0 or now - left_at >= remove_after_s:
            remove.append(url)
            continue
        gone[url] = left_at
        if not replica.draining:
            drain.append(url)
    add.extend(url for url, ok in serving.items() if ok and url not in held)
    return SlicePlan(tuple(remove), tuple(drain), tuple(add), gone)
