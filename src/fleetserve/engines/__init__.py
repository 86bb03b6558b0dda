"""Engine adapters (vllm, llamacpp, sim) and the simulated engine."""
