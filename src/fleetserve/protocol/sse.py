"""Server-sent events as OpenAI streams them: `data: <json>\\n\\n`, ending in `data: [DONE]`."""

from __future__ import annotations

import orjson

from fleetserve.errors import ApiError
from fleetserve.protocol.envelope import api_error_body

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def encode_event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def encode_error_event(err: ApiError) -> bytes:
    """The event that ends a stream that failed mid-way (OpenAI's error shape in a data line)."""
    return b"data: " + api_error_body(err) + b"\n\n"


class SseDecoder:
    """Incremental decoder: feed raw bytes as they arrive, get whole events' data fields.

    Handles events split across reads, CRLF or LF line ends, multi-line data fields and
    comment lines (ignored), following the WHATWG event-stream rules that matter here.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        events: list[bytes] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = self._buf[:nl]
            self._buf = self._buf[nl + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished event are buffered."""
        return bool(self._buf.strip() or self._data)
