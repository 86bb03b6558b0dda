"""The exception hierarchy of fleetserve.

FleetserveError
├── ConfigError                  bad settings or fleet file (raised at start-up)
├── EngineError                  an engine replica failed to launch or become ready
├── ActuatorError                scaling failed: a replica could not be started or stopped,
│                                or the Kubernetes API refused or could not be reached
├── ObserveError                 the autoscaler could not read the fleet (its step is skipped)
├── DiscoveryError               discovery could not read the replica set (it retries; the
│                                fleet keeps its last view meanwhile)
├── ApiError                     answered to a client in OpenAI's error envelope
│   ├── InvalidRequestError      400 invalid_request_error
│   ├── AuthenticationError      401 invalid_api_key
│   ├── PermissionDeniedError    403 (model_not_allowed: the key's tenant may not use it)
│   ├── ModelNotFoundError       404 model_not_found
│   ├── NotFoundError            404 (no such path)
│   ├── MethodNotAllowedError    405
│   ├── RequestTimeoutError      408 (the client sent its request too slowly)
│   ├── PayloadTooLargeError     413
│   ├── ConflictError            409 (admin API: the tenant or key already exists)
│   ├── RateLimitError           429 rate_limit_exceeded, with Retry-After
│   ├── InsufficientQuotaError   429 insufficient_quota (the tenant's budget is spent)
│   ├── UpstreamFailedError      502 (a replica answered badly and no retry was left)
│   ├── NoReplicaError           503, with Retry-After
│   ├── ServiceUnavailableError  503 (the shared limit counters are unreachable: fail_closed)
│   └── GatewayTimeoutError      504 (connect, first byte or idle timeout)
└── UpstreamError                a replica failed one attempt; the proxy decides on failover
    ├── UpstreamConnectError     could not connect (retryable)
    ├── UpstreamTimeoutError     .phase is "connect", "first_byte" or "idle"
    ├── UpstreamStatusError      answered with an error status (5xx retryable)
    └── UpstreamClosedError      the connection broke while reading the body
"""

from __future__ import annotations

from typing import Literal


class FleetserveError(Exception):
    """Base of every error fleetserve raises on purpose."""


class ConfigError(FleetserveError):
    """Settings or the fleet file are invalid."""


class EngineError(FleetserveError):
    """An engine replica could not be launched or did not become ready."""


class ActuatorError(FleetserveError):
    """An actuator could not carry out a scaling step; the message names what it scaled."""


class ObserveError(FleetserveError):
    """The autoscaler could not observe the fleet or gateway; it skips the step, never guesses."""


class DiscoveryError(FleetserveError):
    """Discovery could not list or watch where replicas are; the message names the source."""


class ApiError(FleetserveError):
    """An error answered to the client as `{"error": {"message", "type", "code"}}`."""

    status: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}


class InvalidRequestError(ApiError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationError(ApiError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ApiError):
    status = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class ModelNotFoundError(ApiError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(ApiError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowedError(ApiError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeoutError(ApiError):
    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLargeError(ApiError):
    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class RateLimitError(ApiError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ConflictError(ApiError):
    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class InsufficientQuotaError(ApiError):
    status = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamFailedError(ApiError):
    status = 502
    error_type = "server_error"
    code = "upstream_error"


class NoReplicaError(ApiError):
    status = 503
    error_type = "server_error"
    code = "no_replica_available"


class ServiceUnavailableError(ApiError):
    status = 503
    error_type = "server_error"
    code = "service_unavailable"


class GatewayTimeoutError(ApiError):
    status = 504
    error_type = "timeout_error"
    code = "upstream_timeout"


class UpstreamError(FleetserveError):
    """One attempt against one replica failed."""

    retryable: bool = True


class UpstreamConnectError(UpstreamError):
    """The replica refused or dropped the connection before answering."""


TimeoutPhase = Literal["connect", "first_byte", "idle"]


class UpstreamTimeoutError(UpstreamError):
    """The replica did not connect, answer, or send the next chunk in time."""

    def __init__(self, phase: TimeoutPhase, timeout_s: float) -> None:
        super().__init__(f"upstream {phase.replace('_', ' ')} timeout after {timeout_s:g}s")
        self.phase: TimeoutPhase = phase
        self.timeout_s = timeout_s


class UpstreamStatusError(UpstreamError):
    """The replica answered with an error status; its body is kept to pass on."""

    def __init__(self, status: int, body: bytes, content_type: str | None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type
        self.retryable = status >= 500


class UpstreamClosedError(UpstreamError):
    """The connection broke after the response had started."""
