"""The gateway: an OpenAI-compatible HTTP front over the fleet's replicas."""
