"""A small pipelining Redis (RESP2) client for the gateway's hot path: the limiters' EVALSHA.

redis-py's asyncio client costs about 56 us of CPU per call here (hiredis parsing; 81 us
without), a connection per concurrent call taken from a pool under a lock; this client costs
about 15 us: commands from any number of tasks are written on one long-lived connection as
they come, and the replies, parsed by hiredis's C reader, resolve their futures in order
(benchmarks/tenancy_overhead.py; measured 2026-12-03). It speaks only what the limiters need:
AUTH and SELECT at connect, then commands with bulk-string arguments. Errors are redis-py's
exception classes, so the callers handle one family: `ConnectionError` (the connection broke
or could not be made), `TimeoutError` (no reply within `timeout_s`: the connection is closed
and every call on it fails, as a late reply could not be told from the next one),
`ResponseError` and its NOSCRIPT and NOPERM subclasses. A broken connection is replaced by
the next call.
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
    """One command as a RESP array of bulk strings (hiredis's C encoder: half the CPU of
    the cached Python one this replaced, benchmarks/redis_clients.py)."""
    packed: bytes = hiredis.pack_command(cast(Any, args))  # its stub types one element only
    return packed


class _Connection(asyncio.Protocol):
    """One connection; replies resolve the oldest waiting command. A command with no reply
    after `timeout_s` fails it and every command behind it, and closes the connection (a
    sweep checks the oldest, so a call costs no timer of its own)."""

    def __init__(self, timeout_s: float) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []  # commands of this loop iteration, written together
        self._timeout_s = timeout_s
        self._sweep: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody waits for: the stream is out of step
                self._fail(RedisConnectionError("a Redis reply arrived with no command waiting"))
                return
            future = waiting.popleft()[0]
            if future.done():
                continue  # its caller was cancelled
            if isinstance(reply, ResponseError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed'}"))

    def _fail(self, error: Exception) -> None:
        self.lost = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.close()

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()
        if self.lost or self._transport is None:
            future.set_exception(RedisConnectionError("the connection to Redis is closed"))
            return future
        self._waiting.append((future, loop.time()))
        if not self._out:  # the first of this iteration: one write for all of them, next tick
            loop.call_soon(self._flush)
        self._out.append(payload)
        if self._sweep is None:
            self._sweep = loop.call_later(self._timeout_s / 4, self._check)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self.lost and out:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _check(self) -> None:
        self._sweep = None
        if not self._waiting or self.lost:
            return
        if self._loop.time() - self._waiting[0][1] >= self._timeout_s:
            self._fail(RedisTimeoutError(f"Redis did not answer within {self._timeout_s:g} s"))
            return
        self._sweep = self._loop.call_later(self._timeout_s / 4, self._check)

    def close(self) -> None:
        self._fail(RedisConnectionError("the connection to Redis was closed"))


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
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.timeout_s), self._host, self._port
                )
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
        conn = self._conn
        if conn is None or conn.lost:
            conn = await self._connection()
        return await conn.send(encode(args))

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
