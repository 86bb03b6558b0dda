"""JSON answers of the gateway's cold routes (admin, health, tenancy admin)."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from fleetserve.errors import ApiError
from fleetserve.protocol.envelope import api_error_body


def json_response(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def error_response(err: ApiError) -> Response:
    """The error in OpenAI's envelope, with its headers (Retry-After, ...)."""
    return Response(
        api_error_body(err), status_code=err.status, media_type="application/json",
        headers=err.headers,
    )  # fmt: skip
