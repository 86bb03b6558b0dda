"""OpenAI wire protocol: request inspection, SSE codec, error envelope."""
