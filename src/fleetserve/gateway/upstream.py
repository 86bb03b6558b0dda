"""HTTP to replicas, as two clients chosen by measurement (README, design notes).

Buffered (non-stream) requests go through pyqwest (Rust reqwest/hyper): one worker proxies
about 1.5-2x the requests per core that aiohttp's client does, and cancelling the awaiting
task aborts the request in Rust, so a client that leaves frees the engine (pyreqwest, also
measured, could not: its requests ran on to the end). Streams go through aiohttp, whose chunk
reads stay on the event loop; the Rust clients hand each chunk across threads and cost 2-3x
more per stream. Both map their failures to `fleetserve.errors.Upstream*Error`, with the
phase (connect, first byte, idle) that decides failover.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType

import aiohttp
import pyqwest

from fleetserve.config import TimeoutSettings
from fleetserve.errors import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class BufferedResponse:
    status: int
    content_type: str
    body: bytes


class UpstreamStream:
    """An open streaming response whose status was 2xx. Read with `next_chunk()`."""

    def __init__(self, response: aiohttp.ClientResponse, idle_s: float) -> None:
        self._response = response
        self._idle_s = idle_s
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "text/event-stream")

    async def next_chunk(self, timeout_s: float | None = None) -> bytes:
        """The next bytes as they arrived (b"" at the end); idle timeout between chunks."""
        limit = self._idle_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit):
                return await self._response.content.readany()
        except TimeoutError as exc:
            if timeout_s is None:
                raise UpstreamTimeoutError("idle", limit) from exc
            raise UpstreamTimeoutError("first_byte", limit) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamClosedError(f"connection to replica broke mid-stream: {exc}") from exc

    def close(self) -> None:
        """Drop the connection (an unfinished stream cannot go back to the pool)."""
        self._response.close()


class _StreamContext:
    def __init__(self, client: UpstreamClient, url: str, body: bytes, request_id: str) -> None:
        self._client = client
        self._url = url
        self._body = body
        self._request_id = request_id
        self._stream: UpstreamStream | None = None

    async def __aenter__(self) -> UpstreamStream:
        timeouts = self._client.timeouts
        try:
            async with asyncio.timeout(timeouts.first_byte_s):
                response = await self._client.session.post(
                    self._url,
                    data=self._body,
                    headers={"Content-Type": JSON, "X-Request-Id": self._request_id},
                )
        except TimeoutError as exc:
            raise UpstreamTimeoutError("first_byte", timeouts.first_byte_s) from exc
        except aiohttp.ServerTimeoutError as exc:  # sock_connect
            raise UpstreamTimeoutError("connect", timeouts.connect_s) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(f"cannot connect to replica: {exc.os_error}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamClosedError(f"replica closed the connection: {exc}") from exc
        if response.status >= 400:
            try:
                async with asyncio.timeout(timeouts.idle_s):
                    body = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                body = b""
            finally:
                response.release()
            raise UpstreamStatusError(response.status, body, response.headers.get("Content-Type"))
        self._stream = UpstreamStream(response, timeouts.idle_s)
        return self._stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            if exc_type is None:
                self._stream._response.release()
            else:
                self._stream.close()


class UpstreamClient:
    """One per gateway worker: pooled keep-alive connections to every replica."""

    def __init__(self, timeouts: TimeoutSettings) -> None:
        self.timeouts = timeouts
        # Only the connect timeout is reqwest's; the first-byte deadline is asyncio's, so each
        # phase is named correctly and a timeout cancels (aborts) the request.
        self._transport = pyqwest.HTTPTransport(
            connect_timeout=timeouts.connect_s,
            pool_idle_timeout=30.0,
            enable_gzip=False,
            enable_brotli=False,
            enable_zstd=False,
            follow_redirects=False,
            enable_otel=False,
        )
        self._buffered = pyqwest.Client(self._transport)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the running event loop (as aiohttp requires)."""
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
        await self._transport.aclose()

    async def send(self, url: str, body: bytes, request_id: str) -> BufferedResponse:
        """POST and read the whole answer; non-2xx answers raise UpstreamStatusError."""
        headers = {"content-type": JSON, "x-request-id": request_id}
        try:
            async with asyncio.timeout(self.timeouts.first_byte_s):
                response = await self._buffered.post(url, headers, body)
        except pyqwest.ConnectTimeout as exc:
            raise UpstreamTimeoutError("connect", self.timeouts.connect_s) from exc
        except TimeoutError as exc:
            raise UpstreamTimeoutError("first_byte", self.timeouts.first_byte_s) from exc
        except ConnectionError as exc:
            raise UpstreamConnectError(f"cannot connect to replica: {exc}") from exc
        except (pyqwest.ReadError, pyqwest.WriteError, pyqwest.RemoteProtocolError) as exc:
            raise UpstreamClosedError(f"replica closed the connection: {exc}") from exc
        content_type = response.headers.get("content-type", JSON)
        if response.status >= 400:
            raise UpstreamStatusError(response.status, response.content, content_type)
        return BufferedResponse(response.status, content_type, response.content)

    def stream(self, url: str, body: bytes, request_id: str) -> _StreamContext:
        """`async with client.stream(...) as s:` opens a stream; non-2xx raise on entry."""
        return _StreamContext(self, url, body, request_id)
