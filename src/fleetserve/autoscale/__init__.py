"""The autoscaler: pure policy (decide), the observe/decide/actuate loop, signals.

`policy.decide(observation, state, config) -> (Decision, state)` is the whole policy;
`signals.observe(...)` builds its observation from the fleet's snapshots and gateway figures.
"""
