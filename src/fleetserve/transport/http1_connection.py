"""One keep-alive HTTP/1.1 connection to a replica: an asyncio.Protocol fed to httptools.

It parses one response at a time and wakes the one task reading it. A stream's body is handed
on as it arrives; a buffered one is kept (bounded) until complete. Nothing is raised into
the event loop: what goes wrong (a parse error, an oversize head or body, the connection
lost) is kept as the `UpstreamError` for the reader to raise, and the transport is aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import httptools

from fleetserve.errors import UpstreamClosedError, UpstreamConnectError, UpstreamError

MAX_HEAD_BYTES = 64 * 1024
PAUSE_AT_BYTES = 256 * 1024  # unread stream bytes at which the socket stops being read


class Connection(asyncio.Protocol):
    """One TCP connection to a replica, parsing one response at a time."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        forget: Callable[[Connection], None],
        stamp: Callable[[], float] | None = None,
        capture: frozenset[bytes] = frozenset(),
    ):
        self.loop = loop
        self._forget = forget
        # Bench's options; the gateway passes neither and pays one check per read and header.
        self._stamp = stamp  # clock read as each read arrives: per-chunk arrival times
        self._arrival = 0.0
        self.stamps: list[float] = []  # arrival time of each entry of _chunks, when stamping
        self._capture = capture  # lower-case names of response headers to keep
        self.headers: dict[str, str] = {}
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[bool] | None = None
        self._chunks: list[bytes] = []
        self.unread = 0  # bytes in _chunks
        self.body_limit = 0  # 0: a stream, wake the reader per read; else buffer up to this
        self._paused = False
        self._received = 0  # bytes of the current response so far
        self._head_bytes = 0
        self._framed = False  # the body has a Content-Length or Transfer-Encoding
        self.closed = False
        self.origin: tuple[str, int] | None = None  # (host, port) the client dialled
        self.poolable = True  # False once the client forgot its origin: closed after use
        self.in_use = False
        self.reused = False
        self.idle_since = 0.0
        self.error: UpstreamError | None = None
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.status = 0
        self.content_type: str | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self.in_use or self.error is not None:
            self.abort()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._received += len(data)
        if self._stamp is not None:
            self._arrival = self._stamp()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback of ours raised, if it was one
            reason = str(cause) if isinstance(cause, UpstreamError) else repr(exc)
            self._fail(UpstreamClosedError(f"malformed response from replica: {reason}"))
            return
        if not self.head_done and self._received > MAX_HEAD_BYTES:
            self._fail(UpstreamClosedError(f"response head from replica over {MAX_HEAD_BYTES} B"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._forget(self)
        if not self.in_use or self.complete or self.error is not None:
            return
        if self.head_done and not self._framed:  # a body delimited by EOF (HTTP/1.0 style)
            self.complete = True
            self._wake(True)
        elif self._received == 0:
            why = f": {exc}" if exc else ""
            self._fail(UpstreamConnectError(f"replica closed the connection before answering{why}"))
        else:
            why = f": {exc}" if exc else ""
            self._fail(UpstreamClosedError(f"replica closed the connection mid-response{why}"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        self._head_bytes += size + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise UpstreamClosedError(f"response head over {MAX_HEAD_BYTES} B")
        if size == 12 and name.lower() == b"content-type":
            self.content_type = value.decode("latin-1")
        elif (size == 14 and name.lower() == b"content-length") or (
            size == 17 and name.lower() == b"transfer-encoding"
        ):
            self._framed = True
        if self._capture:
            lowered = name.lower()
            if lowered in self._capture:
                self.headers[lowered.decode("latin-1")] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self.head_done = True
        if self.status in (204, 304):
            self._framed = True
        if not self.body_limit:
            self._wake(True)

    def on_body(self, body: bytes) -> None:
        if not body or self.error is not None:
            return
        self._chunks.append(body)
        if self._stamp is not None:
            self.stamps.append(self._arrival)
        self.unread += len(body)
        if self.body_limit:
            if self.unread > self.body_limit:
                self._fail(UpstreamClosedError(f"response body over {self.body_limit} B"))
            return  # buffered: the reader wakes once, when the response is complete
        if self.unread > PAUSE_AT_BYTES and not self._paused and self._transport is not None:
            self._paused = True  # the reader fell behind: let TCP push back on the replica
            self._transport.pause_reading()
        self._wake(True)

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake(True)

    # used by the client

    def begin(self, request: bytes, body_limit: int) -> None:
        """Send one request; the previous response on this connection is complete."""
        assert self._transport is not None
        self.in_use = True
        self.head_done = self.complete = self._framed = False
        self._received = self._head_bytes = 0
        self.status = 0
        self.content_type = None
        if self.headers:
            self.headers = {}
        self.body_limit = body_limit
        self._transport.write(request)

    def take(self) -> bytes:
        """Every body byte received and not yet taken, in one piece."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.stamps.clear()
        self.unread = 0
        if self._paused:
            self._resume()
        return data

    def take_parts(self) -> tuple[list[bytes], list[float]]:
        """The unread body pieces as they came, with their arrival times (when stamping)."""
        chunks, stamps = self._chunks, self.stamps
        self._chunks, self.stamps = [], []
        self.unread = 0
        if self._paused:
            self._resume()
        return chunks, stamps

    def buffer(self, limit: int) -> None:
        """From now on keep the body (up to `limit` bytes) until the response is complete."""
        self.body_limit = limit
        if self.unread > limit:
            self._fail(UpstreamClosedError(f"response body over {limit} B"))
        elif self._paused:
            self._resume()

    def _resume(self) -> None:
        self._paused = False
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    async def wait(self, deadline: float) -> bool:
        """Until the parser makes progress (True) or the loop's clock passes `deadline`."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self._waiter = waiter
        timer = self.loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def idle(self) -> bool:
        """Whether the connection can carry another request."""
        return (
            self.complete
            and self.keep_alive
            and not self.closed
            and self.error is None
            and self._transport is not None
            and not self._transport.get_write_buffer_size()
        )

    def _wake(self, value: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.abort()
        self._wake(True)

    def abort(self) -> None:
        """Drop the connection now; it is never reused."""
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
