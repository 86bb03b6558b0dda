"""A pooled keep-alive HTTP/1.1 client for plain-http replicas, on asyncio.Protocol + httptools.

It does only what the gateway and bench need: POST a JSON body and read the answer whole or
as it arrives. Bench also asks for extra request headers (an API key), arrival times of each
read (`stamp`) and chosen response headers (`capture_headers`); the gateway passes none.
Against pyqwest (buffered) and aiohttp (streams) it cuts the gateway's CPU per request by
40-65 % (README, "HTTP stack, chosen by measurement"). Failures are raised as
`fleetserve.errors.Upstream*Error`, named by the phase that decides failover:

- connect: the TCP connect timed out (`UpstreamTimeoutError("connect")`) or failed
  (`UpstreamConnectError`);
- first byte: no response head in time (`UpstreamTimeoutError("first_byte")`). A connection
  closed or reset before any byte of the answer is an `UpstreamConnectError`; on a reused
  pooled connection that is a stale keep-alive, and the request is sent once more on a fresh
  connection instead;
- after that: a connection that breaks, or an answer that does not parse, is an
  `UpstreamClosedError`; the next bytes not coming in time, an `UpstreamTimeoutError`.

A connection goes back to the pool only after a complete response that allows keep-alive.
Anything else (an error, a timeout, a cancelled task) aborts it: closing the socket is what
makes vLLM and llama.cpp stop generating for a client that left.

Replicas come and go (new ports, new pod IPs): `forget(url)` drops what the client keeps for
one that left (its pool and cached request heads), so the pool does not grow with every
replica ever seen; the gateway calls it when the Fleet removes a replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import urlsplit

from fleetserve.errors import TimeoutPhase, UpstreamConnectError, UpstreamTimeoutError
from fleetserve.transport.http1_connection import Connection

MAX_BODY_BYTES = 64 * 1024 * 1024  # buffered responses; streams are handed on as they come
_MAX_TARGETS = 4096  # cached request heads (replicas x paths), cleared when exceeded
_MIN_SWEEP_AT = 64  # pools (origins) before dead ones are looked for

Origin = tuple[str, int]


class _StaleConnectionError(Exception):
    """A reused connection was closed by the replica before it answered: safe to resend."""


class Response:
    """The answer to one request. Call `finish()` or `abort()` on it exactly once."""

    __slots__ = ("_client", "_conn", "_origin", "content_type", "status")

    def __init__(self, client: Http1Client, origin: Origin, conn: Connection) -> None:
        self._client = client
        self._origin = origin
        self._conn = conn
        self.status = conn.status
        self.content_type = conn.content_type

    @property
    def headers(self) -> dict[str, str]:
        """The response headers named in the client's `capture_headers` (lower-case names)."""
        return self._conn.headers

    async def next_parts(
        self, timeout_s: float, phase: TimeoutPhase
    ) -> tuple[list[bytes], list[float]]:
        """Like `next_chunk`, but the pieces as read, each with its arrival time on the
        client's `stamp` clock (the times are empty without one); empty lists at the end."""
        conn = self._conn
        deadline = 0.0
        while True:
            if conn.unread:
                return conn.take_parts()
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return [], []
            if not deadline:
                deadline = conn.loop.time() + timeout_s
            if not await conn.wait(deadline):
                raise UpstreamTimeoutError(phase, timeout_s)

    def body(self) -> bytes:
        """The whole body of a buffered response (complete when `request` returned it)."""
        return self._conn.take()

    async def next_chunk(self, timeout_s: float, phase: TimeoutPhase) -> bytes:
        """The body bytes received since the last call, as they came; b"" at the end."""
        conn = self._conn
        deadline = 0.0
        while True:
            if conn.unread:
                return conn.take()
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return b""
            if not deadline:
                deadline = conn.loop.time() + timeout_s
            if not await conn.wait(deadline):
                raise UpstreamTimeoutError(phase, timeout_s)

    async def read(self, timeout_s: float, limit: int) -> bytes:
        """The rest of the body, at most `limit` bytes, within `timeout_s`."""
        conn = self._conn
        conn.buffer(limit)
        deadline = conn.loop.time() + timeout_s
        while not conn.complete or conn.error is not None:
            if conn.error is not None:
                raise conn.error
            if not await conn.wait(deadline):
                raise UpstreamTimeoutError("idle", timeout_s)
        return conn.take()

    def finish(self) -> None:
        """Back to the pool if the response is complete and allows keep-alive; else closed."""
        self._client.release(self._origin, self._conn)

    def abort(self) -> None:
        self._conn.abort()


class Http1Client:
    """One per gateway worker: a LIFO pool of keep-alive connections per (host, port)."""

    def __init__(
        self,
        connect_timeout_s: float,
        *,
        max_idle_per_origin: int = 256,
        idle_expiry_s: float = 30.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        headers: Mapping[str, str] | None = None,
        stamp: Callable[[], float] | None = None,
        capture_headers: Iterable[str] = (),
    ) -> None:
        """`headers` go on every request; `stamp` (a clock) times each read of a body;
        `capture_headers` names the response headers that `Response.headers` keeps."""
        self.connect_timeout_s = connect_timeout_s
        self._extra_head = _header_lines(headers or {})
        self._stamp = stamp
        self._capture = frozenset(name.lower().encode("latin-1") for name in capture_headers)
        self.max_body_bytes = max_body_bytes
        self.max_idle_per_origin = max_idle_per_origin
        self.idle_expiry_s = idle_expiry_s
        self._idle: dict[Origin, list[Connection]] = {}
        self._sweep_at = _MIN_SWEEP_AT  # pools at which dead ones are next dropped
        self._targets: dict[str, tuple[Origin, bytes]] = {}
        self._open: set[Connection] = set()  # every live connection, for close()
        self._closed = False

    def idle_count(self, origin: Origin) -> int:
        return sum(not conn.closed for conn in self._idle.get(origin, ()))

    def origins(self) -> set[Origin]:
        """The origins the client keeps anything for: a pool or a cached request head."""
        return set(self._idle) | {origin for origin, _ in self._targets.values()}

    def forget(self, origin: Origin | str) -> None:
        """Drop what is kept for an origin (or a URL's): close its idle connections, drop its
        pool and cached request heads. Its connections in use finish their request and are
        then closed, not pooled. A later request to it starts afresh."""
        if isinstance(origin, str):
            origin = _origin_of(origin)
        for conn in self._idle.pop(origin, ()):
            conn.abort()
        if any(target_origin == origin for target_origin, _ in self._targets.values()):
            self._targets = {u: t for u, t in self._targets.items() if t[0] != origin}
        for conn in self._open:
            if conn.origin == origin:
                conn.poolable = False

    async def request(
        self,
        url: str,
        body: bytes,
        request_id: str,
        first_byte_s: float,
        *,
        stream: bool,
        traceparent: str | None = None,
    ) -> Response:
        """POST `body`; return once the head (stream) or the whole answer (not) is in.

        `first_byte_s` counts from the request being sent; `traceparent` (W3C) is sent as
        that header when given.
        """
        origin, head = self._target(url)
        trace = b"" if traceparent is None else b"\r\ntraceparent: " + traceparent.encode()
        request = b"".join(
            (head, request_id.encode("latin-1"), trace, b"\r\nContent-Length: ",
             str(len(body)).encode(), b"\r\n\r\n", body)
        )  # fmt: skip
        limit = 0 if stream else self.max_body_bytes
        conn = self._checkout(origin) or await self._connect(origin)
        try:
            try:
                await self._exchange(conn, request, limit, first_byte_s)
            except _StaleConnectionError:
                conn = await self._connect(origin)  # once: a fresh connection is not stale
                await self._exchange(conn, request, limit, first_byte_s)
        except BaseException:
            conn.abort()
            raise
        return Response(self, origin, conn)

    async def _exchange(
        self, conn: Connection, request: bytes, limit: int, first_byte_s: float
    ) -> None:
        conn.begin(request, limit)
        deadline = conn.loop.time() + first_byte_s
        while not (conn.complete if limit else conn.head_done) or conn.error is not None:
            error = conn.error
            if error is not None:
                if conn.reused and isinstance(error, UpstreamConnectError):
                    raise _StaleConnectionError from error
                raise error
            if not await conn.wait(deadline):
                raise UpstreamTimeoutError("first_byte", first_byte_s)

    def _target(self, url: str) -> tuple[Origin, bytes]:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"not an http:// URL: {url!r}")
            host, port = _origin_of(url)
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            head = (
                (
                    f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n"
                    "Content-Type: application/json\r\nConnection: keep-alive\r\n"
                ).encode("latin-1")
                + self._extra_head
                + b"X-Request-Id: "
            )
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            target = self._targets[url] = ((host, port), head)
        return target

    def _checkout(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.loop.time() - conn.idle_since > self.idle_expiry_s:
                for old in (conn, *idle):  # LIFO: the ones below are older still
                    old.abort()
                idle.clear()
                return None
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def _connect(self, origin: Origin) -> Connection:
        if self._closed:
            raise UpstreamConnectError("the upstream client is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, self._open.discard, self._stamp, self._capture),
                    *origin,
                )
        except TimeoutError as exc:
            raise UpstreamTimeoutError("connect", self.connect_timeout_s) from exc
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to replica: {exc}") from exc
        conn.origin = origin
        if not conn.closed:
            self._open.add(conn)
        return conn

    def release(self, origin: Origin, conn: Connection) -> None:
        """Pool `conn` if it can carry another request and there is room; else close it."""
        conn.in_use = False
        if not conn.idle() or not conn.poolable or self._closed:
            conn.abort()
            return
        idle = self._idle.get(origin)
        if idle is None:
            if len(self._idle) >= self._sweep_at:
                self._drop_dead_pools()
            idle = self._idle[origin] = []
        if len(idle) >= self.max_idle_per_origin:
            conn.abort()
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)

    def _drop_dead_pools(self) -> None:
        """Drop pools with no open connection (a replica that went away without `forget`,
        say one picked just before it left). Run when the pools have doubled since the last
        run, so it costs O(1) per new pool and they stay under twice the live ones."""
        dead = [o for o, idle in self._idle.items() if all(conn.closed for conn in idle)]
        for origin in dead:
            del self._idle[origin]
        self._sweep_at = max(_MIN_SWEEP_AT, 2 * len(self._idle))

    async def close(self) -> None:
        """Close every connection, pooled or in use."""
        self._closed = True
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # the transports report connection_lost on the next turn


def _origin_of(url: str) -> Origin:
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    return parts.hostname or "", parts.port or default_port


def _header_lines(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if any(c in name + value for c in "\r\n\0") or not name or ":" in name:
            raise ValueError(f"invalid request header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")
