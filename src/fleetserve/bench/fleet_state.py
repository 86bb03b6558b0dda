"""Read the target fleet's state out of what its endpoints answer: pure, no I/O, no clock.

Two kinds of answer, each turned into the fields of a `FleetSample` (the caller stamps `t_s`):

- a fleetserve gateway's `GET /admin/fleet` JSON (`by_state`, `ready`, `replicas` with
  `in_flight`, `running`, `waiting`; `held` per model where the gateway reports it) and, when
  an autoscaler runs, `GET /admin/autoscaler` (its latest desired replica count);
- a Prometheus exposition (`/metrics`) of a fleetserve gateway (`fleetserve_replicas{state}`,
  `fleetserve_desired_replicas`, `fleetserve_in_flight`, `fleetserve_held_requests`), of one
  vLLM engine (`vllm:num_requests_running`/`_waiting`, also what `fleetserve engine sim`
  exports) or of one llama.cpp server (`llamacpp:requests_processing`/`_deferred`).

A field the answer does not carry is None (unknown), never 0. Both parsers read JSON and text
written by other programs (and other versions of fleetserve) defensively: a shape they do not
know gives None for the fields it would have fed, not an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Families read from a Prometheus exposition (names as the parser reports them, without a
# counter's `_total`). Only their lines are parsed: an engine's page has hundreds of others.
GATEWAY_REPLICAS = "fleetserve_replicas"
GATEWAY_DESIRED = "fleetserve_desired_replicas"
GATEWAY_IN_FLIGHT = "fleetserve_in_flight"
GATEWAY_HELD = "fleetserve_held_requests"
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
LLAMACPP_PROCESSING = "llamacpp:requests_processing"
LLAMACPP_DEFERRED = "llamacpp:requests_deferred"
WANTED_FAMILIES = frozenset({
    GATEWAY_REPLICAS, GATEWAY_DESIRED, GATEWAY_IN_FLIGHT, GATEWAY_HELD,
    VLLM_RUNNING, VLLM_WAITING, LLAMACPP_PROCESSING, LLAMACPP_DEFERRED,
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class FleetState:
    """A FleetSample without its time."""

    replicas_ready: int | None = None
    replicas_desired: int | None = None
    replicas_starting: int | None = None
    replicas_draining: int | None = None
    in_flight: int | None = None
    queue_depth: int | None = None

    @property
    def known(self) -> bool:
        """Whether the answer told anything at all."""
        return any(
            v is not None
            for v in (self.replicas_ready, self.replicas_desired, self.replicas_starting,
                      self.replicas_draining, self.in_flight, self.queue_depth)
        )  # fmt: skip


def _count(value: object) -> int | None:
    """A non-negative count from JSON or a gauge; None for anything else (bool included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return round(value)


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


# --- fleetserve's admin API ------------------------------------------------------------------


def _held(fleet: Mapping[str, Any]) -> int | None:
    """Requests the gateway holds for a replica: `held` as a number, per model
    (`{"model": n}`), or inside per-model entries of `models` (a list or a mapping)."""
    held = fleet.get("held")
    if isinstance(held, Mapping):
        return _sum_known(_count(v) for v in held.values())
    if held is not None:
        return _count(held)
    models = fleet.get("models")
    entries: Iterable[object] = ()
    if isinstance(models, Mapping):
        entries = models.values()
    elif isinstance(models, list):
        entries = models
    return _sum_known(_count(e.get("held")) for e in entries if isinstance(e, Mapping))


def read_admin_fleet(fleet: object) -> FleetState:
    """The state in a fleetserve gateway's `/admin/fleet` answer (desired is not in it)."""
    if not isinstance(fleet, Mapping):
        return FleetState()
    by_state = fleet.get("by_state")
    states: Mapping[str, Any] = by_state if isinstance(by_state, Mapping) else {}
    ready = _count(fleet.get("ready"))
    if ready is None:
        ready = _count(states.get("ready"))
    raw = fleet.get("replicas")
    replicas = [r for r in raw if isinstance(r, Mapping)] if isinstance(raw, list) else None
    in_flight = waiting = None
    if replicas is not None:
        # Every replica the gateway knows is listed, so an empty list is a known 0.
        in_flight = _sum_known(_count(r.get("in_flight")) for r in replicas)
        in_flight = 0 if not replicas else in_flight
        waiting = _sum_known(_count(r.get("waiting")) for r in replicas)
    held = _held(fleet)
    queue = None if waiting is None and held is None else (waiting or 0) + (held or 0)
    return FleetState(
        replicas_ready=ready,
        replicas_starting=_count(states.get("starting")),
        replicas_draining=_count(states.get("draining")),
        in_flight=in_flight,
        queue_depth=queue,
    )


def _latest_desired(node: object, depth: int = 0) -> int | None:
    if depth > 3 or not isinstance(node, Mapping):
        return None
    desired = _count(node.get("desired", node.get("desired_replicas")))
    if desired is not None:
        return desired
    timeline = node.get("timeline")
    if isinstance(timeline, list):
        for event in reversed(timeline):
            found = _latest_desired(event, depth + 1)
            if found is not None:
                return found
    models = node.get("models")
    if isinstance(models, Mapping):
        return _sum_known(_latest_desired(m, depth + 1) for m in models.values())
    if isinstance(models, list):
        return _sum_known(_latest_desired(m, depth + 1) for m in models)
    return None


def read_admin_autoscaler(answer: object) -> int | None:
    """The latest desired replica count in `/admin/autoscaler`, summed over models.

    Accepts `desired` (or `desired_replicas`) at the top, the last entry of a `timeline` list
    that has one, or per-model entries under `models` (a list or a mapping) of either shape.
    """
    return _latest_desired(answer)


# --- Prometheus ------------------------------------------------------------------------------


def _wanted_lines(text: str) -> str:
    """Only the lines of the families read here, so parsing costs little on a big page."""
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(maxsplit=3)
            name = parts[2] if len(parts) > 2 and parts[1] in ("TYPE", "HELP") else ""
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in WANTED_FAMILIES:
            keep.append(line)
    return "\n".join(keep) + "\n"


def _gauges(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of the wanted families; raises ValueError if the text is not an exposition."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(_wanted_lines(text)):
        for sample in family.samples:
            if sample.name in WANTED_FAMILIES:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _total(samples: list[tuple[dict[str, str], float]] | None) -> int | None:
    if samples is None:
        return None
    return _sum_known(_count(v) for _, v in samples)


def read_prometheus(text: str) -> FleetState:
    """The state in one `/metrics` page: a fleetserve gateway's, a vLLM's or a llama.cpp's.

    An engine's page is one replica, ready since it answers; its running requests are the
    in-flight ones and its waiting (deferred) ones the queue. A gateway's page does not carry
    the engines' waiting requests, so its queue depth is unknown (None). Raises ValueError if
    the text is not a Prometheus exposition.
    """
    gauges = _gauges(text)
    replicas = gauges.get(GATEWAY_REPLICAS)
    if replicas is not None:
        by_state: dict[str, int] = {}
        for labels, value in replicas:
            count = _count(value)
            if count is not None:
                state = labels.get("state", "")
                by_state[state] = by_state.get(state, 0) + count
        return FleetState(
            replicas_ready=by_state.get("ready", 0),
            replicas_desired=_total(gauges.get(GATEWAY_DESIRED)),
            replicas_starting=by_state.get("starting", 0),
            replicas_draining=by_state.get("draining", 0),
            in_flight=_total(gauges.get(GATEWAY_IN_FLIGHT)),
        )
    for running, waiting in ((VLLM_RUNNING, VLLM_WAITING), (LLAMACPP_PROCESSING,
                                                              LLAMACPP_DEFERRED)):  # fmt: skip
        if running in gauges or waiting in gauges:
            return FleetState(
                replicas_ready=1,
                in_flight=_total(gauges.get(running)),
                queue_depth=_total(gauges.get(waiting)),
            )
    return FleetState()
