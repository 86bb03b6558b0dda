"""The real Redis on 127.0.0.1:6379 for tests: reachable or skipped (failed under CI), and a
random key prefix per test, deleted after (others use the same Redis at the same time)."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from fleetserve.testing.redis import delete_redis_prefix

REDIS_URL = "redis://127.0.0.1:6379/0"


async def require_redis() -> None:
    """Skip the test when Redis is not there; under CI (which runs it), fail."""
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        message = f"Redis at 127.0.0.1:6379 is not reachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI runs one)")
        pytest.skip(message)
    finally:
        await client.aclose()


def random_prefix(what: str = "limits") -> str:
    return f"test-{what}-{secrets.token_hex(6)}"


async def delete_prefix(prefix: str) -> None:
    await delete_redis_prefix(REDIS_URL, prefix)


async def keys_under(prefix: str) -> list[str]:
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return sorted([key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)])
    finally:
        await client.aclose()


@asynccontextmanager
async def isolated_prefix(what: str = "limits") -> AsyncIterator[str]:
    await require_redis()
    prefix = random_prefix(what)
    try:
        yield prefix
    finally:
        await delete_prefix(prefix)


class TcpProxy:
    """A TCP relay to Redis that a test can cut (as if Redis went away) and restore."""

    def __init__(self, upstream_port: int = 6379) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and break every relayed connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.transport.abort()
