"""A SIMULATED vLLM replica: the OpenAI API and vLLM's metrics over a latency model, no model.

For tests, benchmarks and capacity studies that one CPU machine cannot serve for real. The
pure parts (profiles, text, KV blocks, the batching scheduler) carry no I/O so that the
cluster simulator in `fleetserve.sim` can reuse them on its own clock.
"""
