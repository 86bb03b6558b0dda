"""OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import orjson

from fleetserve.errors import ApiError


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


def api_error_body(err: ApiError) -> bytes:
    return error_body(err.message, err.error_type, err.code, err.param)
