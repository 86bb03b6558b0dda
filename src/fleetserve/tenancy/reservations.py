"""What an admission reserves against a budget: the worst case, or a capped `max_tokens`.

The worst case is `ceil(prompt_tokens * input_rate + max_tokens * output_rate)` micro-dollars
(the rates are micro-dollars per token, i.e. USD per million tokens). When it does not fit what
is left and the client gave no `max_tokens`, the request may still go with fewer output tokens:
`floor((left - prompt_cost) / output_rate)` of them, if that is at least one.

lua/admit.lua does the same arithmetic, in the same order of IEEE operations (the client
sends the rates and the prompt's exact cost as round-tripping decimal strings), so both
limiters cap a request to the same token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetserve.tenancy.limiter import Estimate

# Float noise in rate x tokens must not add a micro-dollar (as model.cost_micro_usd).
FLOAT_SLACK = 1e-9
MAX_STEPS_DOWN = 4


@dataclass(frozen=True, slots=True)
class BudgetFit:
    cost_micro_usd: int  # what is reserved
    max_tokens: int | None  # set: the output cap that made it fit (lower than asked)


def prompt_cost(estimate: Estimate) -> float:
    return estimate.prompt_tokens * estimate.input_micro_usd_per_token


def cost_of(prompt_cost_micro_usd: float, output_tokens: int, output_rate: float) -> int:
    return math.ceil(prompt_cost_micro_usd + output_tokens * output_rate - FLOAT_SLACK)


def worst_case_micro_usd(estimate: Estimate) -> int:
    """What the request costs at most: its prompt and `max_tokens` of output."""
    return max(
        0, cost_of(prompt_cost(estimate), estimate.max_tokens, estimate.output_micro_usd_per_token)
    )


def fit_budget(estimate: Estimate, worst_micro_usd: int, left_micro_usd: int) -> BudgetFit | None:
    """What the request reserves when `left_micro_usd` is left, or None if it cannot go."""
    if worst_micro_usd <= left_micro_usd:
        return BudgetFit(worst_micro_usd, None)
    rate = estimate.output_micro_usd_per_token
    if estimate.max_tokens_given or rate <= 0:
        return None
    base = prompt_cost(estimate)
    room = (left_micro_usd - base) / rate  # output tokens the rest pays for, in reals
    if room < 1:
        return None
    # Fewer than asked: the worst case did not fit.
    affordable = estimate.max_tokens - 1 if room >= estimate.max_tokens - 1 else math.floor(room)
    # The floor is exact in reals; in floats the cost of `affordable` may still round a
    # micro-dollar over, so step down until it fits (a step or two at most).
    for _ in range(MAX_STEPS_DOWN):
        if affordable < 1:
            return None
        cost = cost_of(base, affordable, rate)
        if cost <= left_micro_usd:
            return BudgetFit(cost, affordable)
        affordable -= 1
    return None
