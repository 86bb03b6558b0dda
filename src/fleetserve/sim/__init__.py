"""Discrete-event cluster simulator reusing autoscale.policy and the engines latency model."""
