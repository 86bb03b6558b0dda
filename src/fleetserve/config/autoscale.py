"""The autoscaler's policy settings: a model's `autoscale:` section of the fleet file."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

ScalingPolicyKind = Literal["pods", "percent"]
SelectPolicy = Literal["max", "min", "disabled"]


class ScalingPolicy(BaseModel):
    """One step limit, as the HPA's `behavior` HPAScalingPolicy: at most `value` pods (or
    `value` percent of the count at the period's start) per `period_s`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ScalingPolicyKind = Field(description="pods: a number of replicas; percent: a share")
    value: int = Field(ge=1, description="replicas, or percent of the count at period start")
    period_s: float = Field(gt=0, le=1800, description="the sliding period the limit applies to")


class ScalingRules(BaseModel):
    """How fast one direction may move (the HPA's HPAScalingRules)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stabilization_window_s: float = Field(
        ge=0,
        le=3600,
        description="recommendations this far back are considered: scale-up takes their minimum, "
        "scale-down their maximum (0: act on the latest alone)",
    )
    policies: tuple[ScalingPolicy, ...] = Field(min_length=1, description="step limits")
    select: SelectPolicy = Field(
        "max",
        description="max: the policy allowing the largest step wins; min: the smallest; "
        "disabled: never move in this direction",
    )


# Scale-up acts on a load seen in two consecutive 5 s observations (a 10 s window), so one
# sampled burst does not start a replica whose cold start (45 s for the sim a10g profile, a model
# load for vLLM) costs far more than the 5 s of extra evidence. Steps are the HPA's defaults:
# the larger of +4 pods and +100% per 15 s.
DEFAULT_SCALE_UP = ScalingRules(
    stabilization_window_s=10.0,
    policies=(
        ScalingPolicy(kind="pods", value=4, period_s=15.0),
        ScalingPolicy(kind="percent", value=100, period_s=15.0),
    ),
    select="max",
)
# Scale-down keeps the highest recommendation of the last 60 s instead of the HPA's 300 s: an
# LLM replica is expensive to keep idle, and 60 s still bridges the pauses between bursts of a
# conversation (Ray Serve waits 600 s; KEDA's cooldown is 300 s, both tuned for cheap replicas).
# The step is the HPA's default, 100% per 15 s: draining makes a large step safe.
DEFAULT_SCALE_DOWN = ScalingRules(
    stabilization_window_s=60.0,
    policies=(ScalingPolicy(kind="percent", value=100, period_s=15.0),),
    select="max",
)


class AutoscaleSettings(BaseModel):
    """The autoscaler's policy for one model. Defaults suit the embedded default (llama.cpp
    replicas with 8 slots) and the simulated engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: int = Field(1, ge=0, description="floor; 0 allows scale to zero when idle")
    max_replicas: int = Field(4, ge=1, description="ceiling")
    period_s: float = Field(5.0, gt=0, description="seconds between two decisions")
    # 6 of llama.cpp's 8 slots (75%): headroom for the next request while batching stays full,
    # as Ray Serve's target_ongoing_requests (2) sits below max_ongoing_requests (5).
    target_concurrency: float = Field(
        6.0, gt=0, description="requests per ready replica (in flight + engine waiting) to aim at"
    )
    target_queue: float = Field(
        2.0, gt=0, description="requests waiting per replica (engine queue + gateway held)"
    )
    target_kv_usage_frac: float = Field(
        0.8, gt=0, le=1, description="mean KV-cache use to aim at (vLLM preempts near 1.0)"
    )
    ttft_slo_s: float | None = Field(
        None, gt=0, description="gateway-measured TTFT p95 to keep under (None: not a signal)"
    )
    ttft_window_s: float = Field(
        30.0,
        ge=0,
        description="after a scale-up the TTFT signal waits this long before asking again, since "
        "its p95 still covers the time before the new capacity",
    )
    tolerance: float = Field(
        0.1, ge=0, lt=1, description="no change while a usage ratio is within 1 +- tolerance"
    )
    scale_up: ScalingRules = Field(DEFAULT_SCALE_UP, description="window and steps going up")
    scale_down: ScalingRules = Field(DEFAULT_SCALE_DOWN, description="window and steps going down")
    # KEDA's default cooldownPeriod before scaling to zero.
    scale_to_zero_after_s: float = Field(
        300.0,
        gt=0,
        description="with min_replicas 0: idle this long (no arrivals, nothing in "
        "flight or held) before the last replica stops",
    )
    replica_throughput_tps: float | None = Field(
        None,
        gt=0,
        description="tokens/s one replica sustains; with the arrival rate it sizes "
        "the fleet by the utilisation law (None: not a signal)",
    )
    no_flip_s: float = Field(
        15.0, ge=0, description="no change against the last change's direction within this time"
    )

    @field_validator("scale_up", "scale_down", mode="before")
    @classmethod
    def _over_defaults(cls, value: object, info: ValidationInfo) -> object:
        """A partial `scale_up: {stabilization_window_s: 0}` keeps the other default fields."""
        if isinstance(value, dict):
            default = DEFAULT_SCALE_UP if info.field_name == "scale_up" else DEFAULT_SCALE_DOWN
            return {**default.model_dump(), **value}
        return value

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )
        return self
