"""A model of what a tutorial-style Kubernetes HPA sees on a vLLM GPU pod, and what it decides.

The HPA here is the `autoscaling/v2` controller with its defaults (15 s sync period, tolerance
0.1, no scale-up stabilization, 300 s scale-down stabilization, scale-up by the larger of 4 pods
or 100 % per 15 s, scale-down by 100 % per 15 s) and two Resource metrics: CPU utilisation at
70 % and memory utilisation at 80 % of the pod's requests. The desired count per metric follows
`replica_calculator.go`; the behaviour guards reuse `fleetserve.autoscale.guards`, which follow
`horizontal.go`. The CPU and memory a pod uses are a MODEL (`VllmPodModel`); the docstring of
`benchmarks.autoscale_compare` gives its sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleetserve.autoscale import guards
from fleetserve.autoscale.decision import ScaleEvent, TimedRecommendation
from fleetserve.config import ScalingPolicy, ScalingRules

# HPA defaults (kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/).
HPA_SCALE_UP = ScalingRules(
    stabilization_window_s=0.0,
    policies=(
        ScalingPolicy(kind="pods", value=4, period_s=15.0),
        ScalingPolicy(kind="percent", value=100, period_s=15.0),
    ),
    select="max",
)
HPA_SCALE_DOWN = ScalingRules(
    stabilization_window_s=300.0,
    policies=(ScalingPolicy(kind="percent", value=100, period_s=15.0),),
    select="max",
)


@dataclass(frozen=True, slots=True)
class VllmPodModel:
    """CPU and memory of one vLLM pod serving on one GPU (tensor parallel 1).

    CPU (cores) = idle_cores + engine_core_busy_cores * (fraction of the window with work)
                  + api_cpu_s_per_request * requests/s + api_cpu_s_per_token * tokens/s.
    Host memory is the working set after the model load: constant, whatever the load.
    """

    cpu_request_cores: float = 1.0
    memory_request_gib: float = 8.0
    engine_core_busy_cores: float = 1.0
    idle_cores: float = 0.02
    api_cpu_s_per_request: float = 0.002
    api_cpu_s_per_token: float = 30e-6
    memory_working_set_gib: float = 4.0

    def cpu_cores(self, busy_s: float, requests: int, tokens: int, window_s: float) -> float:
        return (
            self.idle_cores
            + self.engine_core_busy_cores * min(1.0, busy_s / window_s)
            + (self.api_cpu_s_per_request * requests + self.api_cpu_s_per_token * tokens) / window_s
        )

    def cpu_utilisation(self, busy_s: float, requests: int, tokens: int, window_s: float) -> float:
        return self.cpu_cores(busy_s, requests, tokens, window_s) / self.cpu_request_cores

    def memory_utilisation(self) -> float:
        return self.memory_working_set_gib / self.memory_request_gib


@dataclass(frozen=True, slots=True)
class HpaSettings:
    min_replicas: int = 1
    max_replicas: int = 8
    target_cpu_utilisation: float = 0.70
    target_memory_utilisation: float = 0.80
    tolerance: float = 0.1
    sync_period_s: float = 15.0
    scale_up: ScalingRules = HPA_SCALE_UP
    scale_down: ScalingRules = HPA_SCALE_DOWN


def metric_replicas(
    current: int, ready: list[float], unready: int, target: float, tolerance: float
) -> int:
    """Replicas one utilisation metric asks for (replica_calculator.go, GetResourceReplicas).

    `ready` holds the utilisation of each pod with a usable sample; `unready` pods (starting,
    or ready too recently to have a sample after readiness) are set aside, and counted at 0 %
    when the ratio says scale up. A result that would reverse the direction holds `current`.
    """
    if not ready:
        return current
    ratio = sum(ready) / (target * len(ready))
    if unready == 0 or ratio <= 1.0:
        if abs(ratio - 1.0) <= tolerance:
            return current
        return math.ceil(ratio * len(ready))
    new_ratio = sum(ready) / (target * (len(ready) + unready))
    if abs(new_ratio - 1.0) <= tolerance or new_ratio < 1.0:
        return current
    wanted = math.ceil(new_ratio * (len(ready) + unready))
    return current if wanted < current else wanted


@dataclass(slots=True)
class HpaController:
    """The HPA's decision at one sync: metrics -> proposal -> stabilization -> rate limits."""

    settings: HpaSettings
    recommendations: list[TimedRecommendation] = field(default_factory=list)
    events: list[ScaleEvent] = field(default_factory=list)
    last_reason: str = ""

    def decide(
        self, now: float, current: int, cpu: list[float], memory: list[float], unready: int
    ) -> int:
        s = self.settings
        by_cpu = metric_replicas(current, cpu, unready, s.target_cpu_utilisation, s.tolerance)
        by_mem = metric_replicas(current, memory, unready, s.target_memory_utilisation, s.tolerance)
        proposal = max(by_cpu, by_mem)
        proposal = min(max(proposal, s.min_replicas), s.max_replicas)
        desired = guards.stabilize(
            proposal,
            self.recommendations,
            now=now,
            baseline=current,
            up_window_s=s.scale_up.stabilization_window_s,
            down_window_s=s.scale_down.stabilization_window_s,
        )
        keep_s = max(s.scale_up.stabilization_window_s, s.scale_down.stabilization_window_s)
        self.recommendations = [
            r for r in (*self.recommendations, TimedRecommendation(now, proposal))
            if r.at > now - keep_s
        ]  # fmt: skip
        if desired > current:
            desired = min(desired, guards.scale_up_limit(current, self.events, s.scale_up, now=now))
        elif desired < current:
            desired = max(
                desired, guards.scale_down_limit(current, self.events, s.scale_down, now=now)
            )
        if desired != current:
            self.events = [e for e in self.events if e.at > now - 60.0]
            self.events.append(ScaleEvent(now, desired - current))
        mean_cpu = sum(cpu) / len(cpu) if cpu else float("nan")
        self.last_reason = (
            f"cpu {mean_cpu:.0%} of request on {len(cpu)} ready (+{unready} unready) -> "
            f"{by_cpu}; memory -> {by_mem}; proposal {proposal}; desired {desired}"
        )
        return desired
