"""HTTP to replicas, through the client chosen by measurement (README, "HTTP stack").

`http://` replicas, the usual case, go through `http1.Http1Client`: pooled keep-alive
HTTP/1.1 on asyncio.Protocol and httptools, which costs the gateway 40-65 % less CPU per
request than pyqwest (buffered) and aiohttp (streams) did. `https://` replicas go through
aiohttp, as TLS is no job for a hand-written client. Both raise
`fleetserve.errors.Upstream*Error`, with the phase (connect, first byte, idle) that decides
failover.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType

import aiohttp

from fleetserve.config import TimeoutSettings
from fleetserve.errors import (
    TimeoutPhase,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from fleetserve.transport.http1 import Http1Client, Response

JSON = "application/json"
SSE = "text/event-stream"
MAX_ERROR_BODY_BYTES = 1024 * 1024  # an error answer of a stream, passed on to the client


@dataclass(frozen=True, slots=True)
class BufferedResponse:
    status: int
    content_type: str
    body: bytes


class UpstreamStream(ABC):
    """An open streaming response whose status was 2xx. Read with `next_chunk()`."""

    status: int
    content_type: str

    @abstractmethod
    async def next_chunk(self, timeout_s: float | None = None) -> bytes:
        """The next bytes as they arrived (b"" at the end). With `timeout_s` (the first chunk)
        a timeout is a first-byte timeout; without it the idle timeout between chunks applies.
        """

    @abstractmethod
    def finish(self) -> None:
        """Return the connection to the pool if the stream ended cleanly, else close it."""

    @abstractmethod
    def close(self) -> None:
        """Drop the connection (an unfinished stream cannot go back to the pool)."""


class _Http1Stream(UpstreamStream):
    def __init__(self, response: Response, idle_s: float) -> None:
        self._response = response
        self._idle_s = idle_s
        self.status = response.status
        self.content_type = response.content_type or SSE

    async def next_chunk(self, timeout_s: float | None = None) -> bytes:
        if timeout_s is None:
            return await self._response.next_chunk(self._idle_s, "idle")
        return await self._response.next_chunk(timeout_s, "first_byte")

    def finish(self) -> None:
        self._response.finish()

    def close(self) -> None:
        self._response.abort()


class _TlsStream(UpstreamStream):
    """The same over aiohttp, for https:// replicas."""

    def __init__(self, response: aiohttp.ClientResponse, idle_s: float) -> None:
        self._response = response
        self._idle_s = idle_s
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", SSE)

    async def next_chunk(self, timeout_s: float | None = None) -> bytes:
        limit = self._idle_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit):
                return await self._response.content.readany()
        except TimeoutError as exc:
            phase: TimeoutPhase = "idle" if timeout_s is None else "first_byte"
            raise UpstreamTimeoutError(phase, limit) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamClosedError(f"connection to replica broke mid-stream: {exc}") from exc

    def finish(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


class _StreamContext:
    def __init__(
        self,
        client: UpstreamClient,
        url: str,
        body: bytes,
        request_id: str,
        first_byte_s: float | None,
        traceparent: str | None = None,
    ) -> None:
        self._client = client
        self._url = url
        self._body = body
        self._request_id = request_id
        self._first_byte_s = first_byte_s
        self._traceparent = traceparent
        self._stream: UpstreamStream | None = None

    async def __aenter__(self) -> UpstreamStream:
        self._stream = await self._client.open_stream(
            self._url, self._body, self._request_id, self._first_byte_s, self._traceparent
        )
        return self._stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            if exc_type is None:
                self._stream.finish()
            else:
                self._stream.close()


class UpstreamClient:
    """One per gateway worker: pooled keep-alive connections to every replica."""

    def __init__(self, timeouts: TimeoutSettings) -> None:
        self.timeouts = timeouts
        self.http1 = Http1Client(timeouts.connect_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """For https:// replicas; created on first use, inside the running event loop."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.http1.close()

    async def send(
        self,
        url: str,
        body: bytes,
        request_id: str,
        timeout_s: float | None = None,
        traceparent: str | None = None,
    ) -> BufferedResponse:
        """POST and read the whole answer within `timeout_s` (default: the first-byte
        timeout); non-2xx answers raise UpstreamStatusError. `traceparent` (W3C) goes with
        the request when given."""
        timeout_s = self.timeouts.first_byte_s if timeout_s is None else timeout_s
        if url.startswith("https://"):
            return await self._send_tls(url, body, request_id, timeout_s, traceparent)
        response = await self.http1.request(
            url, body, request_id, timeout_s, stream=False, traceparent=traceparent
        )
        data = response.body()
        response.finish()
        content_type = response.content_type or JSON
        if response.status >= 400:
            raise UpstreamStatusError(response.status, data, content_type)
        return BufferedResponse(response.status, content_type, data)

    def stream(
        self,
        url: str,
        body: bytes,
        request_id: str,
        first_byte_s: float | None = None,
        traceparent: str | None = None,
    ) -> _StreamContext:
        """`async with client.stream(...) as s:` opens a stream; non-2xx raise on entry.

        The response head must come within `first_byte_s` (default: the first-byte timeout).
        """
        return _StreamContext(self, url, body, request_id, first_byte_s, traceparent)

    async def open_stream(
        self,
        url: str,
        body: bytes,
        request_id: str,
        first_byte_s: float | None = None,
        traceparent: str | None = None,
    ) -> UpstreamStream:
        """The stream behind `stream()`; whoever calls this must `finish()` or `close()` it."""
        timeouts = self.timeouts
        first_byte_s = timeouts.first_byte_s if first_byte_s is None else first_byte_s
        if url.startswith("https://"):
            return await self._open_tls_stream(url, body, request_id, first_byte_s, traceparent)
        response = await self.http1.request(
            url, body, request_id, first_byte_s, stream=True, traceparent=traceparent
        )
        if response.status >= 400:
            try:
                data = await response.read(timeouts.idle_s, MAX_ERROR_BODY_BYTES)
            except UpstreamError:
                data = b""
            except BaseException:
                response.abort()
                raise
            response.finish()
            raise UpstreamStatusError(response.status, data, response.content_type)
        return _Http1Stream(response, timeouts.idle_s)

    # https:// through aiohttp

    async def _post_tls(
        self, url: str, body: bytes, request_id: str, first_byte_s: float, traceparent: str | None
    ) -> aiohttp.ClientResponse:
        """POST; the response head is read. Connect and first-byte failures are mapped."""
        timeouts = self.timeouts
        headers = {"Content-Type": JSON, "X-Request-Id": request_id}
        if traceparent is not None:
            headers["traceparent"] = traceparent
        try:
            async with asyncio.timeout(first_byte_s):
                return await self.session.post(url, data=body, headers=headers)
        except TimeoutError as exc:
            raise UpstreamTimeoutError("first_byte", first_byte_s) from exc
        except aiohttp.ServerTimeoutError as exc:  # sock_connect
            raise UpstreamTimeoutError("connect", timeouts.connect_s) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(f"cannot connect to replica: {exc.os_error}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamClosedError(f"replica closed the connection: {exc}") from exc

    async def _read_tls(self, response: aiohttp.ClientResponse, timeout_s: float) -> bytes:
        try:
            async with asyncio.timeout(timeout_s):
                return await response.read()
        finally:
            response.release()

    async def _send_tls(
        self, url: str, body: bytes, request_id: str, timeout_s: float, traceparent: str | None
    ) -> BufferedResponse:
        """The whole answer within `timeout_s`, head and body together."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        response = await self._post_tls(url, body, request_id, timeout_s, traceparent)
        left_s = max(deadline - asyncio.get_running_loop().time(), 0.001)
        try:
            data = await self._read_tls(response, left_s)
        except TimeoutError as exc:
            raise UpstreamTimeoutError("first_byte", timeout_s) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamClosedError(f"replica closed the connection: {exc}") from exc
        content_type = response.headers.get("Content-Type", JSON)
        if response.status >= 400:
            raise UpstreamStatusError(response.status, data, content_type)
        return BufferedResponse(response.status, content_type, data)

    async def _open_tls_stream(
        self, url: str, body: bytes, request_id: str, first_byte_s: float, traceparent: str | None
    ) -> UpstreamStream:
        response = await self._post_tls(url, body, request_id, first_byte_s, traceparent)
        if response.status >= 400:
            try:
                data = await self._read_tls(response, self.timeouts.idle_s)
            except (TimeoutError, aiohttp.ClientError):
                data = b""
            raise UpstreamStatusError(response.status, data, response.headers.get("Content-Type"))
        return _TlsStream(response, self.timeouts.idle_s)
