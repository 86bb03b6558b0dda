"""fleetserve bench: load schedules, the SSE-timing client, stats and report renderers."""
