"""Keeping a held stream's client with us: the SSE head early, comment lines while it waits.

Clients and proxies between (nginx's proxy_read_timeout is 60 s by default) give up on a
connection that sends nothing; a held stream may wait for a cold start longer than that. So
after `stream_head_after_s` the 200 head with the SSE headers goes out, then a comment line
(which SSE clients ignore) every `keepalive_s`. From then on a failure can only be told
in-stream, as a `data: {"error": ...}` event.
"""

from __future__ import annotations

import orjson

from fleetserve.config import HoldSettings
from fleetserve.protocol.asgi import Send
from fleetserve.protocol.envelope import error_body

SSE_HEADERS_BASE = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"


class StreamKeepAlive:
    """The HoldTicker of a held stream (see gateway/hold.py)."""

    def __init__(
        self, send: Send, settings: HoldSettings, started: float, head_sent: bool = False
    ) -> None:
        self.send = send
        self.keepalive_s = settings.keepalive_s
        self.next_at = started + settings.stream_head_after_s
        self.head_sent = head_sent

    async def tick(self, held_s: float) -> None:
        if not self.head_sent:
            headers = [(b"content-type", SSE_CONTENT_TYPE), *SSE_HEADERS_BASE]
            self.head_sent = True  # before the await: a failed send must not be retried
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        comment = f": waiting for a replica ({held_s:.1f}s)\n\n".encode()
        await self.send({"type": "http.response.body", "body": comment, "more_body": True})
        self.next_at += self.keepalive_s


def answer_as_event(status: int, body: bytes) -> bytes:
    """A replica's error answer as the SSE event that ends a stream whose head is out.

    An OpenAI error envelope passes on as it is (compacted onto one line, as SSE needs);
    anything else is wrapped in one.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return b"data: " + orjson.dumps(payload) + b"\n\n"
    text = body[:200].decode("utf-8", "replace")
    message = f"the replica answered {status}: {text}"
    return b"data: " + error_body(message, "server_error", "upstream_error") + b"\n\n"
