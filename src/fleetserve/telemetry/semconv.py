"""Span attribute names, in one place: the OpenTelemetry GenAI semantic conventions (as of
semconv 1.37: `gen_ai.provider.name` replaced `gen_ai.system`), the HTTP/server ones, the
attributes Langfuse's OTel ingestion maps onto a generation, and fleetserve's own.

Langfuse (packages/shared/src/server/otel in langfuse/langfuse): a span becomes a
*generation* from `langfuse.observation.type=generation` (its highest-priority mapping) or
`gen_ai.operation.name` in chat/text_completion; any span with `gen_ai.request.model` is
taken for one too, so the CLIENT attempt spans carry none of the GenAI request attributes
and say `langfuse.observation.type=span` (otherwise a failover would bill twice). Usage is
read from every `gen_ai.usage.*` attribute except `gen_ai.usage.cost`, which is the total
cost in USD (`langfuse.observation.cost_details`, a JSON object, takes precedence);
`langfuse.observation.completion_start_time` is an ISO 8601 instant; `user.id` is the user.
"""

from __future__ import annotations

# GenAI (https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/)
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"  # chat | text_completion
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"  # seconds
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_COST = "gen_ai.usage.cost"  # USD; not in the spec, read by Langfuse

# HTTP and network
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
URL_PATH = "url.path"
USER_ID = "user.id"  # the tenant (Langfuse's user)

# Langfuse
LANGFUSE_OBSERVATION_TYPE = "langfuse.observation.type"
LANGFUSE_COST_DETAILS = "langfuse.observation.cost_details"  # JSON {input, output, total} USD
LANGFUSE_COMPLETION_START_TIME = "langfuse.observation.completion_start_time"

# fleetserve
FLEETSERVE_REQUEST_ID = "fleetserve.request.id"
FLEETSERVE_REPLICA_ID = "fleetserve.replica.id"
FLEETSERVE_TENANT = "fleetserve.tenant"
FLEETSERVE_ATTEMPT = "fleetserve.attempt"  # 1, 2, ... on each CLIENT span

OPERATION_CHAT = "chat"
OPERATION_TEXT_COMPLETION = "text_completion"
