"""A small pipelining Redis (RESP2) client for the gateway's hot path: the limiters' EVALSHA.

redis-py's asyncio client costs about 56 us of CPU per call here (hiredis parsing; 81 us
without), a connection per concurrent call taken from a pool under a lock; this client costs
about 15 us: commands from any number of tasks are written on one long-lived connection as
they come, and the replies, parsed by hiredis's C reader, resolve their futures in order
(benchmarks/tenancy_overhead.py; measured 2026-12-03). It speaks only what the limiters need:
AUTH and SELECT at connect, then commands with bulk-string arguments. Errors are redis-py's
exception classes, so the callers handle one family: `ConnectionError` (the connection broke
or could not be made), `TimeoutError` (no reply within `timeout_s`: the connection is closed,
as the reply could not be told apart from a later one), `ResponseError` and its NOSCRIPT and
NOPERM subclasses. It does not reconnect by itself more than once per call: a broken
connection is replaced by the next call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_TIMEOUT_S = 0.5


def _error(reply: ResponseError) -> Exception:
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    if text.startswith("NOPERM"):
        return NoPermissionError(text)
    if text.startswith(("WRONGPASS", "NOAUTH")):
        return AuthenticationError(text)
    return reply


def encode(args: tuple[str | int | bytes, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not self._waiting:  # a reply nobody waits for: the stream is out of step
                self._fail(RedisConnectionError("a Redis reply arrived with no command waiting"))
                return
            future = self._waiting.popleft()
            if future.done():
                continue  # its caller timed out; the connection is being closed
            if isinstance(reply, ResponseError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed'}"))

    def _fail(self, error: Exception) -> None:
        self.lost = True
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.close()

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.lost or self._transport is None:
            future.set_exception(RedisConnectionError("the connection to Redis is closed"))
            return future
        self._waiting.append(future)
        self._transport.write(payload)
        return future

    def close(self) -> None:
        self.lost = True
        if self._transport is not None:
            self._transport.close()


class RespClient:
    """Commands to the Redis at `url` (redis://[user:password@]host[:port][/db])."""

    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError("RespClient takes redis://host[:port][/db] URLs")
        self._host = parts.hostname
        self._port = parts.port or 6379
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self._db = int(path) if path else 0
        self.timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None

    @staticmethod
    def supports(url: str) -> bool:
        """Plain TCP only: TLS (rediss://) and unix sockets go through redis-py."""
        return urlsplit(url).scheme == "redis"

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            conn = self._conn
            if conn is not None and not conn.lost:
                return conn
            self._conn = await self._open()
            return self._conn

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                _, conn = await loop.create_connection(_Connection, self._host, self._port)
                hello: list[tuple[str | int | bytes, ...]] = []
                if self._password is not None:
                    auth = ("AUTH", self._username, self._password) if self._username else (
                        "AUTH", self._password)  # fmt: skip
                    hello.append(auth)
                if self._db:
                    hello.append(("SELECT", self._db))
                for command in hello:
                    await conn.send(encode(command))
        except TimeoutError:  # asyncio's, the builtin
            raise RedisTimeoutError(f"Redis at {self._host}:{self._port} did not answer") from None
        except OSError as exc:
            raise RedisConnectionError(
                f"cannot connect to Redis at {self._host}:{self._port}: {exc.strerror or exc}"
            ) from None
        return conn

    async def execute(self, *args: str | int | bytes) -> Any:
        conn = await self._connection()
        future = conn.send(encode(args))
        try:
            async with asyncio.timeout(self.timeout_s):
                return await future
        except TimeoutError:
            conn.close()  # a late reply could not be told from the next command's
            raise RedisTimeoutError(f"Redis did not answer within {self.timeout_s:g} s") from None

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: str | int) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: str | int) -> Any:
        return await self.execute("EVAL", script, numkeys, *keys_and_args)

    async def script_load(self, script: str) -> Any:
        return await self.execute("SCRIPT", "LOAD", script)

    async def ping(self) -> bool:
        return bool(await self.execute("PING"))

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
